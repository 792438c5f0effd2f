//! Which worker thread (runtime) the calling code runs on, and the
//! poison-tolerant lock helpers (`lock`, and `read`/`write` for an `RwLock`).
//!
//! A leaf: it imports nothing of the crate. Upstream keeps shared and reader
//! connections per worker, and striped counters (`counter`) pick their slot
//! by it, so both read it from here rather than from each other.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

thread_local! {
    /// Which worker thread (runtime) this is; 0 outside the worker pool.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the calling thread as worker `i`: shared and reader connections
/// are kept per worker, so a client and the upstream connection it uses
/// run on the same thread and wake each other without crossing threads.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The calling thread's worker index (`set_worker`), 0 when never set.
pub fn worker() -> usize {
    WORKER.with(|w| w.get())
}

/// Locks `m`, taking the data even if a thread panicked while holding it:
/// every mutex in kiln guards state that stays consistent between
/// statements (maps, counters, snapshots), so a panic elsewhere must not
/// turn into a second panic in every later caller.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `lock` for a reader of an `RwLock`.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// `lock` for the writer of an `RwLock`.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
