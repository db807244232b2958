//! Channels: the TCP channel a received connection becomes, and the
//! lookups made on a handler's channels.

use std::ffi::{c_int, c_void, CStr, CString};
use std::os::fd::RawFd;
use std::ptr;

use tcl_sys::Tcl_Channel;

use super::{Interp, TclError, TclResult, TCL_OK, TCL_READABLE, TCL_WRITABLE};

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

impl Interp {
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

    /// Flushes every channel of this interpreter that has output buffered
    /// (`Tcl_GetChannelNamesEx`, `Tcl_Flush`), through the C API: none of
    /// the script's commands (`flush`, `chan`) is called. The interpreter's
    /// result is left empty.
    pub fn flush_all_channels(&self) {
        // SAFETY: interpreter live on this thread; the names list is held
        // (`Obj`) while it is walked; each channel is looked up by name,
        // and only writable ones are flushed (errors ignored: a channel
        // that cannot be flushed now is left as it is).
        unsafe {
            if stub!(tcl_GetChannelNamesEx)(self.as_ptr(), ptr::null()) != TCL_OK {
                stub!(tcl_ResetResult)(self.as_ptr());
                return;
            }
            let names = super::Obj::from_raw(stub!(tcl_GetObjResult)(self.as_ptr()));
            stub!(tcl_ResetResult)(self.as_ptr());
            let Ok(names) = names.list_elements(*self) else { return };
            for name in names {
                let Ok(name) = CString::new(name.to_string_lossy()) else { continue };
                let mut mode: c_int = 0;
                let channel = stub!(tcl_GetChannel)(self.as_ptr(), name.as_ptr(), &mut mode);
                if !channel.is_null() && mode & TCL_WRITABLE != 0 {
                    stub!(tcl_Flush)(channel);
                }
            }
            stub!(tcl_ResetResult)(self.as_ptr());
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
}
