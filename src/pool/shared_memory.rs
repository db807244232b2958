//! Arrays in memory shared by the supervisor and the workers it forks: an
//! anonymous shared mapping made before the first fork, as the scoreboard
//! is, for the rooms that need a few atomics more than a slot has
//! (`recycling`'s turns, `hang_report`'s stack texts).

use std::num::NonZeroUsize;
use std::ptr::NonNull;

use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};

/// Types for which all-zero bytes are a valid value (atomics and arrays
/// of them), so that a fresh mapping holds `len` of them.
///
/// # Safety
/// An implementor must be valid when every byte is zero, and be usable
/// from several processes at once (only atomics inside).
pub unsafe trait Zeroed {}

pub struct SharedArray<T: Zeroed> {
    items: NonNull<T>,
    len: usize,
}

impl<T: Zeroed> SharedArray<T> {
    pub fn new(len: usize) -> nix::Result<SharedArray<T>> {
        let len = len.max(1);
        let bytes = NonZeroUsize::new(len * std::mem::size_of::<T>().max(1)).expect("non-zero");
        // SAFETY: a fresh anonymous mapping, zero-filled by the kernel; all
        // zeroes is a valid T (`Zeroed`).
        let memory =
            unsafe { mmap_anonymous(None, bytes, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED)? };
        Ok(SharedArray { items: memory.cast(), len })
    }

    pub fn get(&self, index: usize) -> &T {
        assert!(index < self.len, "shared array index out of range");
        // SAFETY: index is in range and the mapping lives as long as self.
        unsafe { &*self.items.as_ptr().add(index) }
    }

    /// Item `index` as a `'static` reference, for a forked worker, which
    /// keeps the mapping until it exits.
    pub fn leak(&self, index: usize) -> &'static T {
        // SAFETY: the caller is a worker that never unmaps the array.
        unsafe { &*self.items.as_ptr().add(index.min(self.len - 1)) }
    }
}

impl<T: Zeroed> Drop for SharedArray<T> {
    fn drop(&mut self) {
        let bytes = self.len * std::mem::size_of::<T>().max(1);
        // SAFETY: the mapping was made by `new` with this size, and no
        // reference into it outlives the array in this process.
        let _ = unsafe { munmap(self.items.cast(), bytes) };
    }
}
