//! What FreeBSD and macOS share outright (their files re-export it).

/// Fills `bytes` from the kernel's random source; false if it could not.
pub fn fill_random(bytes: &mut [u8]) -> bool {
    // getentropy takes at most 256 bytes at a time.
    bytes.chunks_mut(256).all(|chunk| {
        // SAFETY: getentropy writes exactly `chunk.len()` bytes into `chunk`.
        unsafe { libc::getentropy(chunk.as_mut_ptr().cast(), chunk.len()) == 0 }
    })
}

/// The address a `NOTIFY_SOCKET` value names: a path (no abstract
/// namespace on these systems).
pub fn notify_address(value: &std::ffi::OsStr) -> nix::Result<nix::sys::socket::UnixAddr> {
    use std::os::unix::ffi::OsStrExt;
    match value.as_bytes() {
        [b'@', ..] => Err(nix::errno::Errno::EAFNOSUPPORT),
        path => nix::sys::socket::UnixAddr::new(path),
    }
}
