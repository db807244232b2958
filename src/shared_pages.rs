//! Memory shared by the accepting process and the workers it forks, laid
//! out so that the kernel, not care, decides who may write what.
//!
//! Each region is a file in memory (`sys::shared_memory_file`) mapped
//! read-write in the process that makes it, as items of whole pages. The
//! file comes with a second descriptor opened read-only. A pool's worker,
//! first thing after its fork (`keep_writable_only`), maps every region
//! again at the same address from the read-only descriptor, but for the
//! pages it may write (its own scoreboard slot and hang-report cell, and
//! items made `Writers::AllWorkers`), and closes both descriptors. Its own
//! items are given fresh pages just before its fork (`SharedPages::renew`),
//! so that nothing a previous owner left behind can write them. A mapping made from a read-only descriptor cannot be made
//! writable again (mprotect says EACCES), and the kernel refuses a write
//! through /proc/self/mem to it: a worker that runs hostile code cannot
//! write what it was not given, whatever it does.
//!
//! Other children (a `fork` of the script's) keep the parent's view: they
//! run the parent's code.

use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::os::fd::{IntoRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, Once};

use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::unistd::{getpid, Pid};

/// Who may write an item once a worker has let go of the rest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// The accepting process, and in a worker only the item it is given
    /// (`keep_writable_only`).
    OneWorker,
    /// Every worker (figures each of them adds to).
    AllWorkers,
}

/// A region's address, size and descriptors, as the registry keeps them.
#[derive(Clone, Copy)]
struct Region {
    base: usize,
    stride: usize,
    items: usize,
    writers: Writers,
    read_write: RawFd,
    read_only: RawFd,
}

static REGIONS: Mutex<Vec<Region>> = Mutex::new(Vec::new());

fn regions() -> MutexGuard<'static, Vec<Region>> {
    REGIONS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// The registry, locked by the forking thread across a fork, so that a
    /// child never finds it locked by a thread it does not have.
    static HELD: RefCell<Option<MutexGuard<'static, Vec<Region>>>> = const { RefCell::new(None) };
}

fn watch_forks() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        crate::fork_safety::on_fork(
            || {
                let _ = HELD.try_with(|held| *held.borrow_mut() = Some(regions()));
            },
            || {
                let _ = HELD.try_with(|held| held.borrow_mut().take());
            },
            || {
                let _ = HELD.try_with(|held| held.borrow_mut().take());
            },
        )
    });
}

/// `items` items of `item_size` bytes, each on pages of its own, shared
/// with the processes forked from this one; all zero at first.
pub struct SharedPages {
    base: NonNull<u8>,
    stride: usize,
    items: usize,
    /// The process that made it: only it unmaps and closes.
    owner: Pid,
}

// SAFETY: the pages hold atomics only (the callers' types), valid for the
// value's life.
unsafe impl Send for SharedPages {}
// SAFETY: as above.
unsafe impl Sync for SharedPages {}

impl SharedPages {
    pub fn new(items: usize, item_size: usize, writers: Writers) -> nix::Result<SharedPages> {
        watch_forks();
        let page = crate::sys::page_size() as usize;
        let stride = item_size.max(1).div_ceil(page) * page;
        let items = items.max(1);
        let bytes = stride * items;
        let _no_fork = (!crate::sys::CLOEXEC_IS_ATOMIC).then(crate::fork_safety::hold_off_forks);
        let (read_write, read_only) = crate::sys::shared_memory_file(bytes)?;
        let length = NonZeroUsize::new(bytes).expect("non-zero");
        // SAFETY: a fresh mapping of a fresh file of `bytes` zero bytes.
        let base = unsafe {
            mmap(None, length, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &read_write, 0)?
        };
        let mut registry = regions();
        registry.push(Region {
            base: base.as_ptr() as usize,
            stride,
            items,
            writers,
            read_write: read_write.into_raw_fd(),
            read_only: read_only.into_raw_fd(),
        });
        Ok(SharedPages { base: base.cast(), stride, items, owner: getpid() })
    }

    /// The start of item `index` (clamped to the last).
    pub fn item(&self, index: usize) -> NonNull<u8> {
        let index = index.min(self.items - 1);
        // SAFETY: in range of the mapping.
        unsafe { NonNull::new_unchecked(self.base.as_ptr().add(index * self.stride)) }
    }

    pub fn items(&self) -> usize {
        self.items
    }

    /// Gives item `index` fresh pages (zero) in this process, for the
    /// worker about to be forked to own: a process its previous owner left
    /// behind (a grandchild it forked, in a session of its own) may still
    /// map the old pages read-write, and must not write what the supervisor
    /// reads of the new owner. The old pages stay with whoever still maps
    /// them; nothing here reads them again. Processes forked before keep
    /// their view of the old ones (read-only in workers, which read only
    /// their own item). Only the process that made the pages renews them.
    pub fn renew(&self, index: usize) -> nix::Result<()> {
        if self.owner != getpid() {
            return Err(nix::errno::Errno::EPERM);
        }
        let index = index.min(self.items - 1);
        let _no_fork = (!crate::sys::CLOEXEC_IS_ATOMIC).then(crate::fork_safety::hold_off_forks);
        let (read_write, _read_only) = crate::sys::shared_memory_file(self.stride)?;
        let length = NonZeroUsize::new(self.stride).expect("non-zero");
        // SAFETY: replaces, at the same address and size, one item of this
        // value's own mapping with a shared mapping of a fresh file of the
        // same size: every reference into the item stays valid (the pages
        // read as zero, a valid value of the atomics the callers keep
        // there), and the kernel swaps the pages in one step, so a thread
        // reading the item meanwhile sees the old pages or the new ones.
        unsafe {
            mmap(
                NonZeroUsize::new(self.item(index).as_ptr() as usize),
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                &read_write,
                0,
            )?;
        }
        Ok(())
    }
}

impl Drop for SharedPages {
    fn drop(&mut self) {
        if self.owner != getpid() {
            return;
        }
        let base = self.base.as_ptr() as usize;
        let mut registry = regions();
        if let Some(at) = registry.iter().position(|r| r.base == base) {
            let region = registry.remove(at);
            let _ = nix::unistd::close(region.read_write);
            let _ = nix::unistd::close(region.read_only);
        }
        // SAFETY: mapped by `new` with this size; no reference into it
        // outlives the value in this process.
        let _ = unsafe { munmap(self.base.cast(), self.stride * self.items) };
    }
}

/// In a pool's worker, right after its fork, before any code of the
/// script's runs: every shared region becomes read-only, but for the items
/// that contain an address of `own` and the items every worker writes,
/// which keep the read-write mapping the worker inherited (an item renewed
/// for it, `SharedPages::renew`, is not in the region's file any more);
/// the regions' descriptors are closed. An error leaves the process unfit
/// to serve.
pub fn keep_writable_only(own: &[usize]) -> nix::Result<()> {
    let mut registry = regions();
    for region in registry.iter() {
        let writable = |index: usize| {
            let start = region.base + index * region.stride;
            region.writers == Writers::AllWorkers
                || own.iter().any(|&address| address >= start && address < start + region.stride)
        };
        // Runs of items the worker may not write, each mapped again in one
        // call from the read-only descriptor.
        let mut index = 0;
        while index < region.items {
            if writable(index) {
                index += 1;
                continue;
            }
            let first = index;
            while index < region.items && !writable(index) {
                index += 1;
            }
            let length = NonZeroUsize::new((index - first) * region.stride).expect("non-zero");
            // SAFETY: replaces, at the same address and size, a mapping of
            // the same file at the same offset: every reference into it
            // stays valid (readable). The worker has one thread now, and
            // writes none of these items.
            unsafe {
                let read_only = std::os::fd::BorrowedFd::borrow_raw(region.read_only);
                mmap(
                    NonZeroUsize::new(region.base + first * region.stride),
                    length,
                    ProtFlags::PROT_READ,
                    MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                    read_only,
                    (first * region.stride) as libc::off_t,
                )?;
            }
        }
    }
    for region in registry.drain(..) {
        let _ = nix::unistd::close(region.read_write);
        let _ = nix::unistd::close(region.read_only);
    }
    Ok(())
}
