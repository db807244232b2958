//! Interpreters: results and errors, evaluation, commands, packages,
//! associated data, parent and child interpreters.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use super::{NameTable, Obj, Size, TclError, TclResult, Tcl_Interp, Tcl_Obj, TCL_ERROR, TCL_OK};

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

    /// The fully qualified name of the namespace the interpreter is in
    /// now (`::` at global level, `::app` inside a proc of `::app`).
    pub fn current_namespace(&self) -> String {
        // SAFETY: the interpreter is live; its current namespace is live
        // while it runs, and its full name is a NUL-terminated string.
        unsafe {
            let namespace = stub!(tcl_GetCurrentNamespace)(self.as_ptr());
            if namespace.is_null() || (*namespace).fullName.is_null() {
                return "::".to_string();
            }
            CStr::from_ptr((*namespace).fullName).to_string_lossy().into_owned()
        }
    }

    /// `Tcl_Preserve`: the interpreter's memory (and its associated data)
    /// stays valid until the matching `release`, even if it is deleted.
    pub fn preserve(&self) {
        // SAFETY: the interpreter is live on this thread.
        unsafe { stub!(tcl_Preserve)(self.as_ptr().cast()) }
    }

    /// `Tcl_Release`: ends a `preserve`.
    ///
    /// # Safety
    /// Matches one `preserve`. When the interpreter was deleted meanwhile
    /// this frees it: this handle, and everything kept with the interpreter
    /// (its associated data), must not be used after.
    pub unsafe fn release(&self) {
        // SAFETY: see the contract.
        unsafe { stub!(tcl_Release)(self.as_ptr().cast()) }
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
