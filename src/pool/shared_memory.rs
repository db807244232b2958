//! Arrays in memory shared by the supervisor and the workers it forks,
//! made before the first fork as the scoreboard is (`shared_pages`), for
//! the rooms that need a few atomics more than a slot has (`hang_report`'s
//! stack texts, one per worker, which only that worker writes).

use crate::shared_pages::{SharedPages, Writers};

/// Types for which all-zero bytes are a valid value (atomics and arrays
/// of them), so that a fresh mapping holds `len` of them.
///
/// # Safety
/// An implementor must be valid when every byte is zero, and be usable
/// from several processes at once (only atomics inside).
pub unsafe trait Zeroed {}

pub struct SharedArray<T: Zeroed> {
    pages: SharedPages,
    _items: std::marker::PhantomData<T>,
}

impl<T: Zeroed> SharedArray<T> {
    /// One item per worker, which only that worker may write
    /// (`hang_report`'s stack texts, one per scoreboard slot).
    pub fn per_worker(len: usize) -> nix::Result<SharedArray<T>> {
        // Pages are zero-filled: all zeroes is a valid T (`Zeroed`).
        Ok(SharedArray {
            pages: SharedPages::new(len, std::mem::size_of::<T>(), Writers::OneWorker)?,
            _items: std::marker::PhantomData,
        })
    }

    pub fn get(&self, index: usize) -> &T {
        assert!(index < self.pages.items(), "shared array index out of range");
        // SAFETY: an item of the mapping, as large as a T and page-aligned;
        // the mapping lives as long as self.
        unsafe { self.pages.item(index).cast::<T>().as_ref() }
    }

    /// Item `index` as a `'static` reference, for a worker about to be
    /// forked, which keeps the mapping until it exits. The item gets fresh
    /// pages first (`SharedPages::renew`): a process the item's previous
    /// worker left behind may still map the old ones read-write. Where the
    /// system refuses fresh pages, the item keeps its own.
    pub fn leak(&self, index: usize) -> &'static T {
        let _ = self.pages.renew(index);
        // SAFETY: the caller is a worker that never unmaps the array.
        unsafe { self.pages.item(index).cast::<T>().as_ref() }
    }
}
