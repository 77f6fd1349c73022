//! The one locking helper the client's `std` mutexes share.
//!
//! The client guards its shared maps with `std::sync::Mutex`: the poll
//! loop must never wait on an async lock, and no `.await` happens while
//! one is held (every critical section is a few map operations).

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, ignoring poisoning: a panic while holding one of these
/// leaves consistent data (see the module docs), so the next user goes on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
