//! The safe layer over the Tcl C API.
//!
//! This is the only module that calls into Tcl. Every call goes through the
//! stubs table (`tclStubsPtr`), which `Socketserver_Init` fills in before
//! anything else runs, so the library never links libtcl itself.
//!
//! Everything here is tied to the thread that owns the interpreter: `Obj`
//! and `Interp` are neither `Send` nor `Sync`.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};

use tcl_sys::{Tcl_Channel, Tcl_TimerToken};
pub use tcl_sys::{Tcl_Event, Tcl_Interp, Tcl_Obj, Tcl_ThreadId};

/// Tcl's type for lengths and counts: `int` in Tcl 8.6, `Tcl_Size` (a
/// `ptrdiff_t`) in Tcl 9. The only place that knows which Tcl this is
/// built for (`cfg(tcl9)`, set by build.rs from the headers).
#[cfg(tcl9)]
pub type Size = tcl_sys::Tcl_Size;
#[cfg(not(tcl9))]
pub type Size = c_int;

/// Whether a forked child would share its parent's event notifier unless
/// it is given one of its own (`notifier_fork`): Tcl 9's on Linux is an
/// epoll instance per thread, with no fork handler; Tcl 8.6's (select and
/// a notifier thread) renews itself in the child.
pub const NOTIFIER_SHARED_ACROSS_FORK: bool = cfg!(tcl9);

pub const TCL_OK: c_int = tcl_sys::TCL_OK as c_int;
pub const TCL_ERROR: c_int = tcl_sys::TCL_ERROR as c_int;
pub const TCL_FILE_EVENTS: c_int = tcl_sys::TCL_FILE_EVENTS as c_int;
pub const TCL_READABLE: c_int = tcl_sys::TCL_READABLE as c_int;
const TCL_WRITABLE: c_int = tcl_sys::TCL_WRITABLE as c_int;

/// Looks up a function in Tcl's stubs table. Use only inside `unsafe`.
macro_rules! stub {
    ($name:ident) => {
        (*tcl_sys::tclStubsPtr).$name.expect(concat!("Tcl stubs table has no ", stringify!($name)))
    };
}

/// In a forked child: the calling thread's notifier finalised and made
/// again (`notifier_fork`, FreeBSD's kqueue notifier).
pub fn renew_notifier() {
    // SAFETY: the stubs table was filled in by `init_stubs` before any fork
    // step was registered; both calls act on the calling thread's notifier.
    unsafe {
        let notifier = stub!(tcl_InitNotifier);
        stub!(tcl_FinalizeNotifier)(std::ptr::null_mut());
        notifier();
    }
}

extern "C" {
    /// `Tcl_InitStubs(interp, "8.6", 0) != NULL`, from `src/stubs_shim.c`.
    fn socketserver_init_stubs(interp: *mut Tcl_Interp) -> c_int;
}

/// Fills in the stubs table from `interp`; returns false (with the
/// interpreter's result set by Tcl) when this Tcl cannot host the extension.
///
/// # Safety
/// `interp` must be a live interpreter, on the thread that owns it.
pub unsafe fn init_stubs(interp: *mut Tcl_Interp) -> bool {
    // SAFETY: the caller passes a live interpreter; the shim only reads it.
    unsafe { socketserver_init_stubs(interp) != 0 }
}

/// A Tcl error on its way to the interpreter.
#[derive(Debug)]
pub enum TclError {
    /// Tcl has already set the result and `-errorcode` (for example
    /// `Tcl_GetIntFromObj` or `Tcl_WrongNumArgs`).
    AlreadySet,
    /// A message and an `-errorcode` list to set.
    Message { message: String, code: Vec<String> },
}

impl TclError {
    pub fn new(message: impl Into<String>, code: &[&str]) -> Self {
        TclError::Message { message: message.into(), code: code.iter().map(|s| s.to_string()).collect() }
    }
}

impl TclError {
    /// A failed system call, worded as `Tcl_PosixError` words it:
    /// `couldn't open socket: address already in use`, with the
    /// `-errorcode` `POSIX EADDRINUSE {address already in use}`.
    pub fn posix(context: &str, errno: i32) -> TclError {
        let (message, name) = posix_error_words(errno);
        TclError::new(format!("{context}: {message}"), &["POSIX", &name, &message])
    }
}

pub type TclResult<T> = Result<T, TclError>;

/// An owned reference to a `Tcl_Obj`: cloning increments its reference
/// count, dropping decrements it.
pub struct Obj {
    ptr: NonNull<Tcl_Obj>,
    _not_send: PhantomData<*mut Tcl_Obj>,
}

impl Obj {
    /// # Safety
    /// `ptr` must point to a live `Tcl_Obj` owned by the current thread.
    pub unsafe fn from_raw(ptr: *mut Tcl_Obj) -> Obj {
        let ptr = NonNull::new(ptr).expect("Tcl returned a null Tcl_Obj");
        // SAFETY: the object is live (caller's promise); Tcl_IncrRefCount is
        // a macro that increments this field.
        unsafe { (*ptr.as_ptr()).refCount += 1 };
        Obj { ptr, _not_send: PhantomData }
    }

    pub fn new_string(s: &str) -> Obj {
        let len = Size::try_from(s.len()).expect("string longer than Tcl allows");
        // SAFETY: Tcl copies `len` bytes from `s` into a new object.
        unsafe { Obj::from_raw(stub!(tcl_NewStringObj)(s.as_ptr().cast(), len)) }
    }

    pub fn new_int(value: i64) -> Obj {
        // SAFETY: creates a fresh object.
        unsafe { Obj::from_raw(stub!(tcl_NewWideIntObj)(value)) }
    }

    pub fn new_list(items: &[Obj]) -> Obj {
        let ptrs: Vec<*mut Tcl_Obj> = items.iter().map(Obj::as_ptr).collect();
        let len = Size::try_from(ptrs.len()).expect("list longer than Tcl allows");
        // SAFETY: Tcl_NewListObj takes its own references to the elements.
        unsafe { Obj::from_raw(stub!(tcl_NewListObj)(len, ptrs.as_ptr())) }
    }

    pub fn new_double(value: f64) -> Obj {
        // SAFETY: creates a fresh object.
        unsafe { Obj::from_raw(stub!(tcl_NewDoubleObj)(value)) }
    }

    /// A dict from key/value pairs (a list of even length is a dict).
    pub fn new_dict(pairs: Vec<(&str, Obj)>) -> Obj {
        let mut items = Vec::with_capacity(pairs.len() * 2);
        for (key, value) in pairs {
            items.push(Obj::new_string(key));
            items.push(value);
        }
        Obj::new_list(&items)
    }

    pub fn as_ptr(&self) -> *mut Tcl_Obj {
        self.ptr.as_ptr()
    }

    /// The value as a double, with Tcl's own error message when it is not one.
    pub fn get_double(&self, interp: Interp) -> TclResult<f64> {
        let mut value: f64 = 0.0;
        // SAFETY: interpreter and object are live on this thread.
        let code = unsafe { stub!(tcl_GetDoubleFromObj)(interp.as_ptr(), self.as_ptr(), &mut value) };
        if code == TCL_OK {
            Ok(value)
        } else {
            Err(TclError::AlreadySet)
        }
    }

    /// The value as a boolean, with Tcl's own error message when it is not one.
    pub fn get_boolean(&self, interp: Interp) -> TclResult<bool> {
        let mut value: c_int = 0;
        // SAFETY: interpreter and object are live on this thread.
        let code = unsafe { stub!(tcl_GetBooleanFromObj)(interp.as_ptr(), self.as_ptr(), &mut value) };
        if code == TCL_OK {
            Ok(value != 0)
        } else {
            Err(TclError::AlreadySet)
        }
    }

    /// The string form of the value (lossy where it is not valid UTF-8).
    pub fn to_string_lossy(&self) -> String {
        let mut len: Size = 0;
        // SAFETY: the object is live; Tcl returns a pointer to `len` bytes it owns.
        unsafe {
            let bytes = stub!(tcl_GetStringFromObj)(self.as_ptr(), &mut len);
            let slice = std::slice::from_raw_parts(bytes.cast::<u8>(), len as usize);
            String::from_utf8_lossy(slice).into_owned()
        }
    }

    /// The value as an `int`, with Tcl's own error message when it is not one.
    pub fn get_int(&self, interp: Interp) -> TclResult<i32> {
        let mut value: c_int = 0;
        // SAFETY: interpreter and object are live on this thread.
        let code = unsafe { stub!(tcl_GetIntFromObj)(interp.as_ptr(), self.as_ptr(), &mut value) };
        if code == TCL_OK {
            Ok(value)
        } else {
            Err(TclError::AlreadySet)
        }
    }

    /// The value as a wide integer, with Tcl's own error message when it
    /// is not one (for ranges that `get_int` would wrap, as Tcl 8.6 does
    /// with values up to 2^32 in magnitude).
    pub fn get_wide(&self, interp: Interp) -> TclResult<i64> {
        let mut value: tcl_sys::Tcl_WideInt = 0;
        // SAFETY: interpreter and object are live on this thread.
        let code = unsafe { stub!(tcl_GetWideIntFromObj)(interp.as_ptr(), self.as_ptr(), &mut value) };
        if code == TCL_OK {
            Ok(value)
        } else {
            Err(TclError::AlreadySet)
        }
    }

    /// The elements of the value as a list, with Tcl's own error message
    /// when it is not a well-formed list.
    pub fn list_elements(&self, interp: Interp) -> TclResult<Vec<Obj>> {
        let mut count: Size = 0;
        let mut elements: *mut *mut Tcl_Obj = ptr::null_mut();
        // SAFETY: interpreter and object are live; Tcl fills `elements` with
        // `count` pointers that stay valid while the list is unchanged, and we
        // take our own references before returning.
        unsafe {
            let code = stub!(tcl_ListObjGetElements)(interp.as_ptr(), self.as_ptr(), &mut count, &mut elements);
            if code != TCL_OK {
                return Err(TclError::AlreadySet);
            }
            Ok((0..count as usize).map(|i| Obj::from_raw(*elements.add(i))).collect())
        }
    }
}

impl Clone for Obj {
    fn clone(&self) -> Obj {
        // SAFETY: self holds a reference, so the object is live.
        unsafe { Obj::from_raw(self.as_ptr()) }
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        // SAFETY: we own one reference; Tcl_DbDecrRefCount frees the object
        // when it was the last one (Tcl_DecrRefCount is a macro over it).
        unsafe { stub!(tcl_DbDecrRefCount)(self.as_ptr(), c"socketserver".as_ptr(), 0) }
    }
}

/// A null-terminated table of names for `Tcl_GetIndexFromObjStruct`. Tcl
/// caches a pointer to the table in the object, so tables must be `static`.
pub struct NameTable<const N: usize>(pub [*const c_char; N]);
// SAFETY: the table holds pointers to string literals only; it is never written.
unsafe impl<const N: usize> Sync for NameTable<N> {}

impl<const N: usize> NameTable<N> {
    pub fn name(&self, index: usize) -> &'static str {
        // SAFETY: every entry but the last is a static C string literal.
        unsafe { CStr::from_ptr(self.0[index]) }.to_str().unwrap_or("")
    }
}

/// A handle on an interpreter, valid while Tcl keeps it alive and only on
/// the thread that owns it.
#[derive(Clone, Copy)]
pub struct Interp {
    ptr: NonNull<Tcl_Interp>,
    _not_send: PhantomData<*mut Tcl_Interp>,
}

impl Interp {
    /// # Safety
    /// `ptr` must be a live interpreter owned by the current thread.
    pub unsafe fn from_raw(ptr: *mut Tcl_Interp) -> Interp {
        Interp { ptr: NonNull::new(ptr).expect("null Tcl_Interp"), _not_send: PhantomData }
    }

    pub fn as_ptr(&self) -> *mut Tcl_Interp {
        self.ptr.as_ptr()
    }

    pub fn set_result(&self, value: &Obj) {
        // SAFETY: interpreter and object are live; Tcl takes its own reference.
        unsafe { stub!(tcl_SetObjResult)(self.as_ptr(), value.as_ptr()) }
    }

    /// Sets the result and `-errorcode` from `error` (no-op for `AlreadySet`).
    pub fn set_error(&self, error: TclError) {
        if let TclError::Message { message, code } = error {
            self.set_result(&Obj::new_string(&message));
            let code: Vec<Obj> = code.iter().map(|c| Obj::new_string(c)).collect();
            // SAFETY: interpreter and list are live; Tcl takes its own reference.
            unsafe { stub!(tcl_SetObjErrorCode)(self.as_ptr(), Obj::new_list(&code).as_ptr()) }
        }
    }

    /// `Tcl_WrongNumArgs`: the core's `wrong # args: should be "..."`.
    pub fn wrong_num_args(&self, objv: &[*mut Tcl_Obj], keep: usize, usage: &str) -> TclError {
        let usage = CString::new(usage).unwrap_or_default();
        // No arguments at all: a null message, or Tcl ends the usage with a space.
        let message = if usage.is_empty() { std::ptr::null() } else { usage.as_ptr() };
        // SAFETY: objv holds at least `keep` live objects (the caller's words).
        unsafe { stub!(tcl_WrongNumArgs)(self.as_ptr(), keep as Size, objv.as_ptr(), message) };
        TclError::AlreadySet
    }

    /// `Tcl_GetIndexFromObjStruct`: the core's `bad option "x": must be ...`.
    pub fn get_index<const N: usize>(&self, word: &Obj, table: &'static NameTable<N>, what: &CStr) -> TclResult<usize> {
        let mut index: c_int = 0;
        // SAFETY: the table is static and null-terminated, entries are
        // pointer-sized; interpreter and object are live.
        let code = unsafe {
            stub!(tcl_GetIndexFromObjStruct)(
                self.as_ptr(),
                word.as_ptr(),
                table.0.as_ptr().cast::<c_void>(),
                std::mem::size_of::<*const c_char>() as _,
                what.as_ptr(),
                0,
                // An int either way; Tcl 9 declares the pointer void *.
                (&mut index as *mut c_int).cast(),
            )
        };
        if code == TCL_OK {
            Ok(index as usize)
        } else {
            Err(TclError::AlreadySet)
        }
    }

    /// Whether `name` resolves to a command from the global namespace.
    pub fn command_exists_globally(&self, name: &str) -> bool {
        let Ok(name) = CString::new(name) else { return false };
        // SAFETY: interpreter is live; a null namespace with TCL_GLOBAL_ONLY
        // resolves the name as a handler evaluated at global level would.
        let command = unsafe {
            stub!(tcl_FindCommand)(self.as_ptr(), name.as_ptr(), ptr::null_mut(), tcl_sys::TCL_GLOBAL_ONLY as c_int)
        };
        !command.is_null()
    }

    /// Evaluates `words` as one command at global level; a non-OK outcome
    /// is reported with `Tcl_BackgroundException`, as Tcl's own
    /// `socket -server` does for its accept callback. Returns whether the
    /// command succeeded.
    pub fn eval_global_in_background(&self, words: &[Obj]) -> bool {
        let ptrs: Vec<*mut Tcl_Obj> = words.iter().map(Obj::as_ptr).collect();
        // SAFETY: interpreter and words are live; Tcl_Preserve keeps the
        // interpreter's memory valid even if the script deletes it.
        unsafe {
            stub!(tcl_Preserve)(self.as_ptr().cast());
            let code = stub!(tcl_EvalObjv)(
                self.as_ptr(),
                ptrs.len() as Size,
                ptrs.as_ptr(),
                tcl_sys::TCL_EVAL_GLOBAL as c_int,
            );
            if code != TCL_OK {
                stub!(tcl_BackgroundException)(self.as_ptr(), code);
            }
            stub!(tcl_Release)(self.as_ptr().cast());
            code == TCL_OK
        }
    }

    /// Reports `error` with `Tcl_BackgroundException` (`interp bgerror`).
    pub fn background_error(&self, error: TclError) {
        self.set_error(error);
        // SAFETY: interpreter is live on this thread.
        unsafe { stub!(tcl_BackgroundException)(self.as_ptr(), TCL_ERROR) }
    }

    /// Wraps a connected TCP socket in a Tcl channel registered in this
    /// interpreter. The channel owns `fd`.
    pub fn adopt_tcp_socket(&self, fd: std::os::fd::OwnedFd) -> Channel {
        use std::os::fd::IntoRawFd;
        let raw = fd.into_raw_fd();
        // SAFETY: Tcl takes ownership of the descriptor (it closes it when
        // the channel is closed); the descriptor number travels as ClientData.
        unsafe {
            let channel = stub!(tcl_MakeTcpClientChannel)(raw as isize as *mut c_void);
            stub!(tcl_RegisterChannel)(self.as_ptr(), channel);
            Channel(channel)
        }
    }

    /// Whether `channel` is still registered in this interpreter under
    /// `name` (the name it was made with). Only the pointer is compared:
    /// `channel` may have been closed, or moved to another thread.
    pub fn holds_channel(&self, name: &str, channel: Channel) -> bool {
        let Ok(name) = CString::new(name) else { return false };
        // SAFETY: interpreter and name are live; Tcl only looks the name up
        // in this interpreter's table of channels.
        unsafe {
            let found = stub!(tcl_GetChannel)(self.as_ptr(), name.as_ptr(), ptr::null_mut());
            stub!(tcl_ResetResult)(self.as_ptr());
            !found.is_null() && found == channel.0
        }
    }

    /// Drops this interpreter's reference to `channel`, which closes it
    /// when no other interpreter holds it (`Tcl_UnregisterChannel`).
    pub fn unregister_channel(&self, channel: Channel) {
        // SAFETY: the caller has just found `channel` registered here
        // (`holds_channel`), so it is open.
        unsafe {
            stub!(tcl_UnregisterChannel)(self.as_ptr(), channel.0);
            stub!(tcl_ResetResult)(self.as_ptr());
        }
    }

    /// Evaluates `script` at global level: its result, or on error the
    /// message.
    pub fn eval_global(&self, script: &Obj) -> Result<Obj, String> {
        // SAFETY: interpreter and script are live; Tcl_Preserve keeps the
        // interpreter's memory valid even if the script deletes it.
        unsafe {
            stub!(tcl_Preserve)(self.as_ptr().cast());
            let code = stub!(tcl_EvalObjEx)(self.as_ptr(), script.as_ptr(), tcl_sys::TCL_EVAL_GLOBAL as c_int);
            let result = Obj::from_raw(stub!(tcl_GetObjResult)(self.as_ptr()));
            let result = if code == TCL_OK || code == tcl_sys::TCL_RETURN as c_int {
                Ok(result)
            } else {
                Err(result.to_string_lossy())
            };
            stub!(tcl_Release)(self.as_ptr().cast());
            result
        }
    }

    /// The descriptor under the channel `name` of this interpreter, for
    /// channels that have one (`Tcl_GetChannelHandle`).
    pub fn channel_fd(&self, name: &str) -> Option<RawFd> {
        let name = CString::new(name).ok()?;
        let mut mode: c_int = 0;
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: interpreter and name are live; Tcl writes the handle (for
        // file and socket channels, the descriptor as a pointer-sized int).
        unsafe {
            let channel = stub!(tcl_GetChannel)(self.as_ptr(), name.as_ptr(), &mut mode);
            if channel.is_null() {
                stub!(tcl_ResetResult)(self.as_ptr());
                return None;
            }
            let direction = if mode & TCL_READABLE != 0 { TCL_READABLE } else { TCL_WRITABLE };
            if stub!(tcl_GetChannelHandle)(channel, direction, (&mut handle as *mut *mut c_void).cast()) != TCL_OK {
                return None;
            }
        }
        Some(handle as isize as RawFd)
    }

    /// The interpreter whose child this one is, if any.
    pub fn parent(&self) -> Option<Interp> {
        #[cfg(tcl9)]
        // SAFETY: the interpreter is live on this thread.
        let parent = unsafe { stub!(tcl_GetParent)(self.as_ptr()) };
        #[cfg(not(tcl9))]
        // SAFETY: as above (Tcl 8.6's name for it).
        let parent = unsafe { stub!(tcl_GetMaster)(self.as_ptr()) };
        // SAFETY: Tcl returned a live interpreter of this thread.
        (!parent.is_null()).then(|| unsafe { Interp::from_raw(parent) })
    }

    /// This interpreter's children (`interp slaves`, which Tcl 9 still
    /// has, safe interpreters too), listed by Tcl's own `interp` command
    /// whatever the script made of the command of that name (renamed,
    /// hidden, replaced by a proc): Tcl's C API has no call that lists
    /// them.
    pub fn children(&self) -> Vec<Interp> {
        let Ok(names) = self.interp_slaves() else { return Vec::new() };
        let Ok(names) = names.list_elements(*self) else { return Vec::new() };
        names
            .iter()
            .filter_map(|name| {
                let name = CString::new(name.to_string_lossy()).ok()?;
                #[cfg(tcl9)]
                // SAFETY: the interpreter and the name are live on this thread.
                let child = unsafe { stub!(tcl_GetChild)(self.as_ptr(), name.as_ptr()) };
                #[cfg(not(tcl9))]
                // SAFETY: as above (Tcl 8.6's name for it).
                let child = unsafe { stub!(tcl_GetSlave)(self.as_ptr(), name.as_ptr()) };
                // SAFETY: Tcl returned a live interpreter of this thread.
                (!child.is_null()).then(|| unsafe { Interp::from_raw(child) })
            })
            .collect()
    }

    /// Runs `interp slaves` in this interpreter through the procedure of
    /// Tcl's `interp` command (`tcl_interp_command`), not through the
    /// command table the script may have changed.
    fn interp_slaves(&self) -> Result<Obj, String> {
        let Some(command) = tcl_interp_command() else {
            return self.eval_global(&Obj::new_string("interp slaves"));
        };
        let words = [Obj::new_string("interp"), Obj::new_string("slaves")];
        let objv: Vec<*mut Tcl_Obj> = words.iter().map(Obj::as_ptr).collect();
        // SAFETY: the procedure is Tcl's own, which takes no client data
        // (checked in `tcl_interp_command`), called as Tcl calls a command:
        // a live interpreter of this thread, and `objv` holding two live
        // objects that `words` keeps referenced for the call. Tcl_Preserve
        // keeps the interpreter's memory valid whatever the call does.
        unsafe {
            stub!(tcl_Preserve)(self.as_ptr().cast());
            let code = command(std::ptr::null_mut(), self.as_ptr(), objv.len() as c_int, objv.as_ptr());
            let result = Obj::from_raw(stub!(tcl_GetObjResult)(self.as_ptr()));
            stub!(tcl_ResetResult)(self.as_ptr());
            stub!(tcl_Release)(self.as_ptr().cast());
            if code == TCL_OK {
                Ok(result)
            } else {
                Err(result.to_string_lossy())
            }
        }
    }

    /// The channel `name` of this interpreter, the bottom one of its stack
    /// (the one `adopt_tcp_socket` made, under a `tls::import`); Tcl's
    /// error for a name it does not know.
    pub fn bottom_channel(&self, name: &str) -> TclResult<Channel> {
        let lookup_error =
            || TclError::new(format!("can not find channel named \"{name}\""), &["TCL", "LOOKUP", "CHANNEL", name]);
        let c_name = CString::new(name).map_err(|_| lookup_error())?;
        // SAFETY: interpreter and name are live; stacked channels are valid
        // while the top one is.
        unsafe {
            let mut channel = stub!(tcl_GetChannel)(self.as_ptr(), c_name.as_ptr(), ptr::null_mut());
            if channel.is_null() {
                stub!(tcl_ResetResult)(self.as_ptr());
                return Err(lookup_error());
            }
            loop {
                let below = stub!(tcl_GetStackedChannel)(channel);
                if below.is_null() {
                    return Ok(Channel(channel));
                }
                channel = below;
            }
        }
    }

    /// Whether the channel `name` of this interpreter is a TCP socket of
    /// Tcl's, or a channel stacked on one (TLS).
    pub fn is_tcp_channel(&self, name: &str) -> bool {
        let Ok(name) = CString::new(name) else { return false };
        // SAFETY: interpreter and name are live; channel types are static
        // structures with a NUL-terminated name.
        unsafe {
            let mut channel = stub!(tcl_GetChannel)(self.as_ptr(), name.as_ptr(), ptr::null_mut());
            if channel.is_null() {
                stub!(tcl_ResetResult)(self.as_ptr());
                return false;
            }
            loop {
                let below = stub!(tcl_GetStackedChannel)(channel);
                if below.is_null() {
                    break;
                }
                channel = below;
            }
            let kind = stub!(tcl_GetChannelType)(channel);
            !kind.is_null() && !(*kind).typeName.is_null() && CStr::from_ptr((*kind).typeName) == c"tcp"
        }
    }

    /// Registers `command` under `name` with `client_data` passed to it.
    pub fn create_command(&self, name: &CStr, command: tcl_sys::Tcl_ObjCmdProc, client_data: *mut c_void) {
        // SAFETY: interpreter is live; client_data is kept alive by the
        // caller for as long as the interpreter is.
        unsafe {
            stub!(tcl_CreateObjCommand)(self.as_ptr(), name.as_ptr(), command, client_data, None);
        }
    }

    /// Adds `pattern` to the export list of namespace `ns`.
    pub fn export(&self, ns: &CStr, pattern: &CStr) {
        // SAFETY: interpreter is live; a missing namespace gives null, which we skip.
        unsafe {
            let namespace = stub!(tcl_FindNamespace)(self.as_ptr(), ns.as_ptr(), ptr::null_mut(), 0);
            if !namespace.is_null() {
                stub!(tcl_Export)(self.as_ptr(), namespace, pattern.as_ptr(), 0);
            }
        }
    }

    pub fn provide_package(&self, name: &CStr, version: &CStr) -> c_int {
        // SAFETY: interpreter is live; Tcl copies both strings.
        unsafe { stub!(tcl_PkgProvideEx)(self.as_ptr(), name.as_ptr(), version.as_ptr(), ptr::null()) }
    }

    /// Gets the value stored under `key` with `set_assoc_data`.
    pub fn get_assoc_data(&self, key: &CStr) -> *mut c_void {
        // SAFETY: interpreter is live; we ask for no delete proc back.
        unsafe { stub!(tcl_GetAssocData)(self.as_ptr(), key.as_ptr(), ptr::null_mut()) }
    }

    /// Stores `data` under `key`; Tcl calls `on_delete` when the interpreter is deleted.
    pub fn set_assoc_data(&self, key: &CStr, on_delete: tcl_sys::Tcl_InterpDeleteProc, data: *mut c_void) {
        // SAFETY: interpreter is live; Tcl copies the key.
        unsafe { stub!(tcl_SetAssocData)(self.as_ptr(), key.as_ptr(), on_delete, data) }
    }
}

/// The core's wording of an errno value (`address already in use`) and its
/// symbolic name (`EADDRINUSE`), as `Tcl_PosixError` reports them.
pub fn posix_error_words(errno: i32) -> (String, String) {
    // SAFETY: both calls return pointers to static strings in Tcl.
    unsafe {
        let message = CStr::from_ptr(stub!(tcl_ErrnoMsg)(errno)).to_string_lossy().into_owned();
        let name = format!("{:?}", nix::errno::Errno::from_raw(errno));
        (message, name)
    }
}

/// Tcl's `string match`: whether `text` matches the glob `pattern`.
pub fn string_match(pattern: &str, text: &str) -> bool {
    let (Ok(pattern), Ok(text)) = (CString::new(pattern), CString::new(text)) else { return false };
    // SAFETY: both are NUL-terminated strings that live across the call.
    unsafe { stub!(tcl_StringCaseMatch)(text.as_ptr(), pattern.as_ptr(), 0) != 0 }
}

/// The Tcl thread that calls this.
pub fn current_thread() -> ThreadId {
    // SAFETY: a plain query, valid on any thread.
    ThreadId(unsafe { stub!(tcl_GetCurrentThread)() })
}

/// A Tcl thread id that may be handed to other threads: the only things done
/// with it are `Tcl_ThreadQueueEvent` and `Tcl_ThreadAlert`, which Tcl
/// allows from any thread.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ThreadId(Tcl_ThreadId);
// SAFETY: the id is an opaque token; see the type's documentation.
unsafe impl Send for ThreadId {}

/// Event procedure type used with `queue_event`.
pub type EventProc = unsafe extern "C" fn(*mut Tcl_Event, c_int) -> c_int;

/// Queues an event carrying `payload` on `thread`'s event queue and wakes
/// that thread. Tcl later calls `proc_` on that thread with a pointer to an
/// `Event<T>`, and frees the event memory after `proc_` returns 1.
pub fn queue_event<T>(thread: ThreadId, proc_: EventProc, payload: T) {
    // SAFETY: Tcl_Alloc returns memory for a whole Event<T>; we initialise
    // every field before handing it over. Queueing and alerting are
    // documented as safe from any thread.
    unsafe {
        let event = stub!(tcl_Alloc)(std::mem::size_of::<Event<T>>() as _).cast::<Event<T>>();
        ptr::write(
            event,
            Event {
                header: Tcl_Event { proc_: Some(proc_), nextPtr: ptr::null_mut() },
                payload: std::mem::ManuallyDrop::new(payload),
            },
        );
        stub!(tcl_ThreadQueueEvent)(thread.0, event.cast(), tcl_sys::Tcl_QueuePosition_TCL_QUEUE_TAIL as _);
        stub!(tcl_ThreadAlert)(thread.0);
    }
}

/// An event as queued by `queue_event`: Tcl's header, then our payload.
#[repr(C)]
pub struct Event<T> {
    header: Tcl_Event,
    payload: std::mem::ManuallyDrop<T>,
}

impl<T> Event<T> {
    /// Moves the payload out of a queued event. Tcl frees the memory itself.
    ///
    /// # Safety
    /// `event` must come from `queue_event::<T>` and be taken at most once.
    pub unsafe fn take_payload(event: *mut Tcl_Event) -> T {
        // SAFETY: per the contract, the event is an Event<T> whose payload
        // has not been taken.
        unsafe { std::mem::ManuallyDrop::take(&mut (*event.cast::<Event<T>>()).payload) }
    }

    /// Whether a queued event was made by `queue_event` with `proc_`.
    ///
    /// # Safety
    /// `event` must point to a live Tcl event.
    pub unsafe fn is_ours(event: *mut Tcl_Event, proc_: EventProc) -> bool {
        // SAFETY: every Tcl event starts with a Tcl_Event header.
        unsafe { (*event).proc_.map(|p| p as usize) == Some(proc_ as usize) }
    }

    /// # Safety
    /// `event` must come from `queue_event::<T>` and its payload not be taken.
    pub unsafe fn payload<'a>(event: *mut Tcl_Event) -> &'a T {
        // SAFETY: see the contract.
        unsafe { &(*event.cast::<Event<T>>()).payload }
    }
}

/// Asks Tcl to call `handler` when the process exits (`Tcl_CreateExitHandler`).
pub fn create_exit_handler(handler: unsafe extern "C" fn(*mut c_void)) {
    // SAFETY: registering a plain function with no client data.
    unsafe { stub!(tcl_CreateExitHandler)(Some(handler), ptr::null_mut()) }
}

/// Asks Tcl to call `handler` when the current thread ends, and when the
/// process exits on it (`Tcl_CreateThreadExitHandler`).
pub fn create_thread_exit_handler(handler: unsafe extern "C" fn(*mut c_void)) {
    // SAFETY: registering a plain function with no client data.
    unsafe { stub!(tcl_CreateThreadExitHandler)(Some(handler), ptr::null_mut()) }
}

/// Removes from the current thread's queue every event for which `filter`
/// returns true (Tcl frees their memory; `filter` must take their payloads).
pub fn delete_events(filter: unsafe extern "C" fn(*mut Tcl_Event, *mut c_void) -> c_int, data: *mut c_void) {
    // SAFETY: Tcl walks only the current thread's queue, calling `filter`.
    unsafe { stub!(tcl_DeleteEvents)(Some(filter), data) }
}

/// Runs a command body: a `TclError` or a panic becomes a Tcl error in
/// `interp`; a panic never unwinds into Tcl.
pub fn run_command(interp: Interp, body: impl FnOnce() -> TclResult<Obj>) -> c_int {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(result)) => {
            interp.set_result(&result);
            TCL_OK
        }
        Ok(Err(error)) => {
            interp.set_error(error);
            TCL_ERROR
        }
        Err(panic) => {
            interp.set_error(panic_error(panic));
            TCL_ERROR
        }
    }
}

pub fn panic_error(panic: Box<dyn std::any::Any + Send>) -> TclError {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    TclError::new(format!("socketserver: internal error: {what}"), &["SOCKETSERVER", "PANIC"])
}

/// A Tcl channel made by `Interp::adopt_tcp_socket`, valid until it is closed.
#[derive(Clone, Copy)]
pub struct Channel(Tcl_Channel);

impl Channel {
    pub fn name(&self) -> String {
        // SAFETY: the channel is open (the caller has just made it).
        unsafe { CStr::from_ptr(stub!(tcl_GetChannelName)(self.0)).to_string_lossy().into_owned() }
    }

    /// A number that names the channel while it is open.
    pub fn key(&self) -> usize {
        self.0 as usize
    }

    /// Asks Tcl to call `proc_(data)` when the channel is closed, however it
    /// is closed (`close`, interpreter deletion, exit).
    pub fn on_close(&self, proc_: unsafe extern "C" fn(*mut c_void), data: *mut c_void) {
        // SAFETY: the channel is open; Tcl keeps `data` as an opaque word.
        unsafe { stub!(tcl_CreateCloseHandler)(self.0, Some(proc_), data) }
    }
}

/// Calls `proc_(data)` on this thread whenever `fd` is readable
/// (`Tcl_CreateFileHandler`); replaces a handler already set for `fd`.
pub fn create_file_handler(fd: c_int, proc_: unsafe extern "C" fn(*mut c_void, c_int), data: *mut c_void) {
    // SAFETY: Tcl only polls the descriptor and passes `data` back.
    unsafe { stub!(tcl_CreateFileHandler)(fd, TCL_READABLE, Some(proc_), data) }
}

/// Removes the file handler of `fd` (`Tcl_DeleteFileHandler`).
pub fn delete_file_handler(fd: c_int) {
    // SAFETY: deleting an absent handler is a no-op in Tcl.
    unsafe { stub!(tcl_DeleteFileHandler)(fd) }
}

/// A one-shot timer made by `create_timer`.
#[derive(Clone, Copy)]
pub struct Timer(Tcl_TimerToken);

/// Calls `proc_(data)` on this thread after `millis` milliseconds.
pub fn create_timer(millis: u32, proc_: unsafe extern "C" fn(*mut c_void), data: *mut c_void) -> Timer {
    let millis = c_int::try_from(millis).unwrap_or(c_int::MAX);
    // SAFETY: Tcl keeps `data` as an opaque word and calls `proc_` once.
    Timer(unsafe { stub!(tcl_CreateTimerHandler)(millis, Some(proc_), data) })
}

/// Cancels a timer that has not fired yet.
pub fn delete_timer(timer: Timer) {
    // SAFETY: deleting a timer that already fired is a no-op in Tcl.
    unsafe { stub!(tcl_DeleteTimerHandler)(timer.0) }
}

/// Waits for and processes one event of any kind (`Tcl_DoOneEvent(0)`).
pub fn do_one_event() {
    // SAFETY: runs this thread's event loop.
    unsafe { stub!(tcl_DoOneEvent)(0) };
}

/// Ends the process as Tcl's `exit` does: exit handlers run, channels are
/// flushed and closed.
#[allow(unreachable_code)] // Tcl 9 declares Tcl_Exit as not returning; 8.6 does not.
pub fn exit(status: i32) -> ! {
    // SAFETY: Tcl_Exit never returns.
    unsafe { stub!(tcl_Exit)(status) };
    unreachable!("Tcl_Exit returned")
}

/// A command procedure, as `Tcl_CreateObjCommand` takes it.
type ObjCmdProc = unsafe extern "C" fn(*mut c_void, *mut Tcl_Interp, c_int, *const *mut Tcl_Obj) -> c_int;

/// The procedure of Tcl's `interp` command, as a new interpreter (where no
/// script has run) has it; the same in every interpreter of the process.
/// `None` where it needs client data of its own (then it belongs to the
/// interpreter it was taken from) or no interpreter can be made.
fn tcl_interp_command() -> Option<ObjCmdProc> {
    static COMMAND: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    let address = (*COMMAND.get_or_init(|| {
        // SAFETY: a new interpreter, queried and deleted on this thread;
        // Tcl fills in `info` when it returns 1.
        unsafe {
            let fresh = stub!(tcl_CreateInterp)();
            if fresh.is_null() {
                return None;
            }
            let mut info: tcl_sys::Tcl_CmdInfo = std::mem::zeroed();
            let found = stub!(tcl_GetCommandInfo)(fresh, c"interp".as_ptr(), &mut info) == 1;
            stub!(tcl_DeleteInterp)(fresh);
            let command = info.objProc.filter(|_| found && info.objClientData.is_null())?;
            Some(command as usize)
        }
    }))?;
    // SAFETY: the address of a Tcl_ObjCmdProc, taken above, in a library
    // that stays loaded as long as the process.
    Some(unsafe { std::mem::transmute::<usize, ObjCmdProc>(address) })
}

/// A Tcl async handler (`Tcl_AsyncCreate`): marked from any thread, its
/// procedure runs on the thread that made it, between two commands of
/// whatever Tcl code runs there, or in its event loop.
#[derive(Clone, Copy)]
pub struct AsyncHandler(tcl_sys::Tcl_AsyncHandler);

// SAFETY: Tcl_AsyncMark is documented as callable from any thread (and
// from a signal handler); the handler is only marked, never freed.
unsafe impl Send for AsyncHandler {}
// SAFETY: as for Send: marking is the only use from other threads.
unsafe impl Sync for AsyncHandler {}

/// The procedure of an async handler: client data, the interpreter that
/// was running (null when called from the event loop), and the code that
/// it must return unchanged.
pub type AsyncProc = unsafe extern "C" fn(*mut c_void, *mut Tcl_Interp, c_int) -> c_int;

/// Makes an async handler for the calling thread.
pub fn create_async(proc_: AsyncProc, data: *mut c_void) -> AsyncHandler {
    // SAFETY: Tcl keeps the procedure and its data until deleted, which we
    // never do (the handler lives as long as the worker process).
    AsyncHandler(unsafe { stub!(tcl_AsyncCreate)(Some(proc_), data) })
}

impl AsyncHandler {
    /// Asks for the handler to run on its thread at the next chance.
    pub fn mark(self) {
        // SAFETY: a handler made by `create_async` and never deleted.
        unsafe { stub!(tcl_AsyncMark)(self.0) }
    }
}

impl Interp {
    /// Evaluates `script` where the interpreter stands now (not at global
    /// level), leaving its result and error state as they were: for code
    /// that runs between two commands of another (an async handler).
    /// Returns the script's result, or on error the message.
    pub fn eval_in_place(&self, script: &Obj) -> Result<Obj, String> {
        // SAFETY: interpreter and script are live on this thread; the
        // saved state is restored (and freed) before returning.
        unsafe {
            let saved = stub!(tcl_SaveInterpState)(self.as_ptr(), 0);
            let code = stub!(tcl_EvalObjEx)(self.as_ptr(), script.as_ptr(), 0);
            let result = Obj::from_raw(stub!(tcl_GetObjResult)(self.as_ptr()));
            stub!(tcl_RestoreInterpState)(self.as_ptr(), saved);
            if code == TCL_OK {
                Ok(result)
            } else {
                Err(result.to_string_lossy())
            }
        }
    }
}
