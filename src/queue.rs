//! The bounded queue between admission and the workers.
//!
//! `async-channel`: a bounded multi-producer multi-consumer channel whose
//! `recv` is async, so N worker tasks share one queue and sleep without
//! holding a runtime thread, and `try_send` fails at once when it is full
//! (that is rule 5: `overloaded`). `crossbeam-channel`, named in the
//! original design, has only blocking receives, which would pin a runtime
//! thread per worker; `tokio::sync::mpsc` has a single consumer.

use crate::request::Request;

pub type QueueTx = async_channel::Sender<Request>;
pub type QueueRx = async_channel::Receiver<Request>;

/// A queue of `capacity` requests.
pub fn bounded(capacity: usize) -> (QueueTx, QueueRx) {
    async_channel::bounded(capacity)
}
