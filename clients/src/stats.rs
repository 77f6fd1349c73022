//! What the client saw: [`ClientStats`], and the counters behind it.
//!
//! Every count goes through [`Counters::count`] with a [`Seen`], so the
//! list of things counted is one enum, not atomics bumped all over.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what the client saw, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClientStats {
    /// Requests published (attempts, retries and re-sends included).
    pub sent: u64,
    /// Retries made after a retryable error reply.
    pub retries: u64,
    /// Replies matched to a waiting request.
    pub replies: u64,
    /// Extra replies for a request id already answered.
    pub duplicates: u64,
    /// Replies for a request that had already timed out.
    pub late: u64,
    /// Messages on our reply topics for no request of ours, or not a JSON
    /// reply, or for a request id a re-send replaced.
    pub strays: u64,
    /// Times the connection came back after being lost.
    pub reconnects: u64,
    /// Requests sent again, with a new id, because the connection dropped
    /// while they waited for their reply (not retries).
    pub resent: u64,
    /// Deltas of streamed answers received (v1.1), including any for a
    /// request no longer waiting.
    pub deltas: u64,
}

/// Something worth counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// A request published.
    Sent,
    /// A request published again after a reconnect (also [`Seen::Sent`]).
    Resent,
    /// A retry decided after an error reply.
    Retry,
    /// A reply handed to its request.
    Reply,
    /// A reply to a request already answered.
    Duplicate,
    /// A reply to a request that gave up waiting.
    Late,
    /// A message no waiting request can take.
    Stray,
    /// A delta of a streamed answer.
    Delta,
}

/// The live counters. Atomics: the poll loop and every caller count
/// without a lock, and no count depends on another.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    resent: AtomicU64,
    retries: AtomicU64,
    replies: AtomicU64,
    duplicates: AtomicU64,
    late: AtomicU64,
    strays: AtomicU64,
    deltas: AtomicU64,
    connects: AtomicU64,
}

impl Counters {
    /// Counts one `what`.
    pub(crate) fn count(&self, what: Seen) {
        let c = match what {
            Seen::Sent => &self.sent,
            Seen::Resent => &self.resent,
            Seen::Retry => &self.retries,
            Seen::Reply => &self.replies,
            Seen::Duplicate => &self.duplicates,
            Seen::Late => &self.late,
            Seen::Stray => &self.strays,
            Seen::Delta => &self.deltas,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a CONNACK; returns the connection's number (1 for the first).
    pub(crate) fn connected(&self) -> u64 {
        self.connects.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The counts now.
    pub(crate) fn snapshot(&self) -> ClientStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            sent: get(&self.sent),
            retries: get(&self.retries),
            replies: get(&self.replies),
            duplicates: get(&self.duplicates),
            late: get(&self.late),
            strays: get(&self.strays),
            reconnects: get(&self.connects).saturating_sub(1),
            resent: get(&self.resent),
            deltas: get(&self.deltas),
        }
    }
}
