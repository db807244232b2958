//! Tcl values: an owned `Tcl_Obj` reference, and the static name tables
//! that `Tcl_GetIndexFromObjStruct` reads.

use std::ffi::{c_char, c_int, CStr};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use super::{Interp, Size, TclError, TclResult, Tcl_Obj, TCL_OK};

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

    /// Gives up this reference without releasing it: it belongs to the
    /// raw pointer now, until `from_owned_raw` takes it back.
    pub fn into_raw(self) -> *mut Tcl_Obj {
        std::mem::ManuallyDrop::new(self).as_ptr()
    }

    /// Takes back the reference that `into_raw` gave up.
    ///
    /// # Safety
    /// `ptr` must come from `into_raw`, on this thread, and be taken once.
    pub unsafe fn from_owned_raw(ptr: *mut Tcl_Obj) -> Obj {
        Obj { ptr: NonNull::new(ptr).expect("null Tcl_Obj"), _not_send: PhantomData }
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

    /// The bytes of the value's string form, as Tcl holds them.
    fn string_bytes(&self) -> &[u8] {
        let mut len: Size = 0;
        // SAFETY: the object is live while `self` is; Tcl returns a pointer
        // to `len` bytes it owns, valid until the value's string changes,
        // which nothing does while the slice is borrowed from `self`.
        unsafe {
            let bytes = stub!(tcl_GetStringFromObj)(self.as_ptr(), &mut len);
            std::slice::from_raw_parts(bytes.cast::<u8>(), len as usize)
        }
    }

    /// The words of the value when evaluating it as a script is calling one
    /// command with exactly those words: a list that has no string form
    /// (made by `list`), or a string in the form Tcl gives a list of those
    /// words (`h`, `obj method`). `None` for anything else that a script
    /// reads otherwise (`h $x`, `hA; hB`, `{}`), or that is not a list.
    pub fn as_command_words(&self) -> Option<Vec<Obj>> {
        let mut count: Size = 0;
        let mut elements: *mut *mut Tcl_Obj = ptr::null_mut();
        // SAFETY: the object is live; the type table is Tcl's own; with no
        // interpreter Tcl_ListObjGetElements leaves no message; the element
        // pointers stay valid while the list is unchanged, and we take our
        // own references at once.
        let (pure, words) = unsafe {
            let list_type = stub!(tcl_GetObjType)(c"list".as_ptr());
            let object = self.as_ptr();
            let pure = (*object).bytes.is_null() && !list_type.is_null() && ptr::eq((*object).typePtr, list_type);
            if stub!(tcl_ListObjGetElements)(ptr::null_mut(), object, &mut count, &mut elements) != TCL_OK {
                return None;
            }
            (pure, (0..count as usize).map(|i| Obj::from_raw(*elements.add(i))).collect::<Vec<Obj>>())
        };
        if words.is_empty() {
            return None;
        }
        if pure || is_plain_words(self.string_bytes()) || Obj::new_list(&words).string_bytes() == self.string_bytes() {
            Some(words)
        } else {
            None
        }
    }

    /// A new value: this one's string, a space, then `tail`'s string (as
    /// Tcl's `socket -server` appends its words to the script it was given).
    pub fn concat_words(&self, tail: &Obj) -> Obj {
        // SAFETY: both objects are live; the duplicate is ours alone (one
        // reference), so appending to it changes nothing else.
        unsafe {
            let joined = Obj::from_raw(stub!(tcl_DuplicateObj)(self.as_ptr()));
            stub!(tcl_AppendToObj)(joined.as_ptr(), c" ".as_ptr(), 1);
            stub!(tcl_AppendObjToObj)(joined.as_ptr(), tail.as_ptr());
            joined
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

/// Whether `text` is words of no character a script or a list treats
/// specially, one space apart (`h`, `obj method`): then it is already the
/// form Tcl gives the list of those words, with no list made to compare.
fn is_plain_words(text: &[u8]) -> bool {
    !text.is_empty()
        && text.first() != Some(&b' ')
        && text.last() != Some(&b' ')
        && !text.windows(2).any(|pair| pair == b"  ")
        && !text.iter().any(|&b| {
            matches!(
                b,
                b'{' | b'}' | b'[' | b']' | b'$' | b'"' | b'\\' | b';' | b'#' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | 0
            )
        })
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
