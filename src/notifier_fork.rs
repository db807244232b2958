//! A notifier of its own for a forked child under Tcl 9.
//!
//! On Linux (`sys::NotifierAfterFork::RenewEpoll`):
//! Tcl 9's notifier on Linux is an epoll instance per thread, plus an
//! eventfd that other threads write to wake that thread. `fork` copies
//! descriptors, not the kernel objects behind them, and Tcl 9 does nothing
//! about it (its select-based notifier on 8.6 has a fork handler; the epoll
//! one has none). Parent and child would share one interest list and one
//! wakeup counter: a child's `Tcl_DeleteFileHandler` removes the parent's
//! registration (the next worker then panics in `epoll_ctl`), and a wakeup
//! meant for the child is read by whichever process looks first, so a
//! connection queued for a worker is never noticed.
//!
//! In the child, each such instance is therefore replaced under its own
//! descriptor number by a new one holding the same registrations, after
//! each eventfd registered in it has been replaced, under its number, by a
//! new counter. Tcl keeps using the same numbers and never notices. The
//! registrations are read (from `/proc/self/fdinfo`) before the fork, on
//! the forking thread: after it, the parent goes on changing the shared
//! list, and the child's copy of Tcl's handlers is as of the fork. Only
//! instances that hold an eventfd, as every Tcl notifier does, are
//! touched (Tcl wakes through an eventfd wherever Linux has one); this is
//! done only where `tcl::NOTIFIER_SHARED_ACROSS_FORK` says so.
//!
//! On FreeBSD (`ReinitTclNotifier`), Tcl 9's notifier is a kqueue per
//! thread (tclKqueueNotfy.c) with a trigger pipe, and no fork handler
//! either. A kqueue is not inherited at all: the child's first
//! `Tcl_CreateFileHandler` would panic in `kevent` (EBADF), and the
//! trigger pipe is shared with the parent, as the eventfd is on Linux. The
//! forking thread's notifier (the only thread the child has) is therefore
//! finalised and initialised again in the child (`tcl::renew_notifier`):
//! a new pipe and a new kqueue. Handlers made before the fork are not in
//! the new kqueue; a worker drops the inherited ones anyway, and Tcl adds
//! a channel's handler again when its watch mask changes.
//!
//! On macOS (`Nothing`), Tcl's notifier is the CoreFoundation one
//! (tclMacOSXNotify.c), which renews itself in the child with
//! `pthread_atfork`.

use std::cell::RefCell;
use std::sync::Once;

use crate::sys::{self, NotifierAfterFork, NotifierCopy};

thread_local! {
    /// The forking thread's snapshot, from before a fork to after it.
    static SNAPSHOT: RefCell<Vec<NotifierCopy>> = const { RefCell::new(Vec::new()) };
}

/// Gives the child of every fork of the process notifiers of its own.
pub fn watch_forks() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| match sys::NOTIFIER_AFTER_FORK {
        NotifierAfterFork::RenewEpoll => crate::fork_safety::on_fork(
            || {
                let notifiers = sys::snapshot_notifiers();
                let _ = SNAPSHOT.try_with(|s| *s.borrow_mut() = notifiers);
            },
            || {
                let _ = SNAPSHOT.try_with(|s| s.borrow_mut().clear());
            },
            || {
                let _ = SNAPSHOT.try_with(|s| sys::renew_notifiers(&std::mem::take(&mut *s.borrow_mut())));
            },
        ),
        NotifierAfterFork::ReinitTclNotifier => crate::fork_safety::on_fork(|| {}, || {}, crate::tcl::renew_notifier),
        NotifierAfterFork::Nothing => {}
    });
}
