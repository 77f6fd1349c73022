//! Reply dispatch: which attempt waits for which request id, handing each
//! reply to it, and counting the replies nobody waits for.
//!
//! A reply is tied to its request by the JSON `requestId`, else the MQTT 5
//! Correlation Data, else the reply topic's last level: the client puts
//! its request id in all three. Ids are remembered a while after their
//! request finished, so that a second copy of a reply counts as a
//! duplicate, one that comes after its attempt gave up as late, and one
//! for a request id a re-send replaced as a stray.
//!
//! A streamed request (v1.1) also gets its deltas: they go to the
//! attempt's delta channel as they come, and only the final reply ends the
//! wait. The channel is unbounded because the poll loop must never wait,
//! and bounded in fact by the answer: the deltas of one request add up to
//! its final reply's text.
//!
//! It also knows whether the connection replies arrive on is up: when it
//! drops, every waiting attempt is woken with [`Wake::Interrupted`] (its
//! request or its reply may be lost), and no attempt can register for a
//! connection that is gone.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

use crate::error::ClientError;
use crate::protocol::{Delta, Reply};
use crate::stats::{Counters, Seen};
use crate::sync::lock;
use crate::transport::Message;

/// Request ids remembered after their request finished, to tell duplicates
/// and late replies from strays.
const REMEMBERED_IDS: usize = 4096;

/// What a waiting attempt is woken with. (`Reply` is the common case and
/// moves once through a oneshot: boxing it would cost an allocation per
/// reply to save bytes on the rare `Interrupted`.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum Wake {
    /// A reply, or the reason one tied to the request could not be read.
    Reply(Result<Reply, ClientError>),
    /// The connection dropped with the request outstanding: it, or its
    /// reply, may be lost. Send it again once subscribed again.
    Interrupted,
}

/// What became of a request id that is no longer waited for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Answered,
    Abandoned,
    /// The connection dropped while it was outstanding; a re-send with a
    /// new id replaced it.
    Superseded,
}

/// The waiting requests, shared by the poll loop and the callers.
#[derive(Debug, Default)]
pub(crate) struct Dispatch {
    /// A `std` mutex (see [`crate::sync`]).
    book: Mutex<Book>,
}

/// One waiting attempt: where its final reply goes, and its deltas if it
/// streams.
#[derive(Debug)]
struct Pending {
    reply: oneshot::Sender<Wake>,
    deltas: Option<mpsc::UnboundedSender<Delta>>,
}

#[derive(Debug, Default)]
struct Book {
    /// The connection replies can arrive on now (its number, counting
    /// CONNACKs), `None` while it is down.
    connection: Option<u64>,
    pending: HashMap<String, Pending>,
    finished: HashMap<String, Fate>,
    finished_order: VecDeque<String>,
}

impl Book {
    fn finish(&mut self, id: String, fate: Fate) {
        if self.finished.insert(id.clone(), fate).is_none() {
            self.finished_order.push_back(id);
            if self.finished_order.len() > REMEMBERED_IDS {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }
}

impl Dispatch {
    /// Connection number `connection` is up.
    pub(crate) fn connected(&self, connection: u64) {
        lock(&self.book).connection = Some(connection);
    }

    /// The connection dropped: wakes every waiting attempt with
    /// [`Wake::Interrupted`] and forgets their ids (a reply to one of
    /// them is a stray from now on). Returns how many there were.
    pub(crate) fn lost(&self) -> usize {
        let interrupted: Vec<_> = {
            let mut book = lock(&self.book);
            book.connection = None;
            let pending: Vec<_> = book.pending.drain().collect();
            for (id, _) in &pending {
                book.finish(id.clone(), Fate::Superseded);
            }
            pending
        };
        let n = interrupted.len();
        for (_, pending) in interrupted {
            let _ = pending.reply.send(Wake::Interrupted);
        }
        n
    }

    /// Registers request `id` as waiting for its reply, if `connection`
    /// (the one its reply subscription was acknowledged on) is still up;
    /// `None` if it is not: subscribe again first. A streamed request
    /// passes where its deltas go.
    pub(crate) fn register(
        &self,
        id: &str,
        connection: u64,
        deltas: Option<mpsc::UnboundedSender<Delta>>,
    ) -> Option<Waiter<'_>> {
        let mut book = lock(&self.book);
        if book.connection != Some(connection) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        book.pending
            .insert(id.to_owned(), Pending { reply: tx, deltas });
        Some(Waiter {
            dispatch: self,
            id: id.to_owned(),
            rx,
        })
    }

    /// Hands a reply to the request waiting for it, or counts it.
    ///
    /// A payload that is not a valid [`Reply`] (an error code this version
    /// does not know, an `error` without `message`) still goes to its
    /// request when it can be tied to one, as [`ClientError::Protocol`]:
    /// counting it as a stray would leave the caller waiting out its whole
    /// reply timeout for an answer that already came.
    pub(crate) fn deliver(&self, m: Message, counters: &Counters) {
        // A delta of a streamed answer, or a reply: told apart first, so
        // each is parsed once.
        if let Some(delta) = crate::protocol::delta_seq(&m.payload)
            .and_then(|_| serde_json::from_slice::<Delta>(&m.payload).ok())
        {
            let id = request_id(delta.request_id.clone(), &m);
            counters.count(Seen::Delta);
            match lock(&self.book)
                .pending
                .get(&id)
                .and_then(|p| p.deltas.as_ref())
            {
                // A receiver gone means its attempt is ending: nothing to do.
                Some(tx) => drop(tx.send(delta)),
                None => tracing::debug!(request_id = %id, "delta for no streamed request ignored"),
            }
            return;
        }
        let parsed = serde_json::from_slice::<Reply>(&m.payload);
        let json_id = match &parsed {
            Ok(reply) => reply.request_id.clone(),
            Err(_) => serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| v.get("requestId")?.as_str().map(str::to_owned)),
        };
        let id = request_id(json_id, &m);
        let mut book = lock(&self.book);
        let waiter = book.pending.remove(&id).map(|p| p.reply);
        let wake = match (parsed, waiter) {
            (Ok(reply), Some(tx)) => (Wake::Reply(Ok(reply)), tx),
            (Err(e), Some(tx)) => {
                tracing::debug!(topic = %m.topic, error = %e, "unreadable reply");
                let error = format!("unreadable reply on {}: {e}", m.topic);
                (Wake::Reply(Err(ClientError::Protocol(error))), tx)
            }
            (Err(e), None) => {
                drop(book);
                tracing::debug!(topic = %m.topic, error = %e, "not a JSON reply");
                counters.count(Seen::Stray);
                return;
            }
            (Ok(_), None) => {
                match book.finished.get(&id).copied() {
                    Some(Fate::Answered) => {
                        tracing::debug!(request_id = %id, "duplicate reply ignored");
                        counters.count(Seen::Duplicate);
                    }
                    Some(Fate::Abandoned) => {
                        tracing::debug!(request_id = %id, "late reply ignored");
                        counters.count(Seen::Late);
                        // A second copy of it is a duplicate.
                        book.finished.insert(id, Fate::Answered);
                    }
                    Some(Fate::Superseded) => {
                        tracing::debug!(request_id = %id, "reply to a request sent again under a new id ignored");
                        counters.count(Seen::Stray);
                    }
                    None => {
                        tracing::debug!(topic = %m.topic, "stray reply ignored");
                        counters.count(Seen::Stray);
                    }
                }
                return;
            }
        };
        book.finish(id, Fate::Answered);
        drop(book);
        counters.count(Seen::Reply);
        let (wake, tx) = wake;
        let _ = tx.send(wake);
    }

    /// The attempt waiting for `id` gave up (or was dropped).
    fn abandon(&self, id: &str) {
        let mut book = lock(&self.book);
        if book.pending.remove(id).is_some() {
            book.finish(id.to_owned(), Fate::Abandoned);
        }
    }
}

/// The request id a message answers: the JSON's `requestId`, else the
/// Correlation Data, else the reply topic's last level (the client puts
/// its request id in all three).
fn request_id(json_id: Option<String>, m: &Message) -> String {
    json_id
        .or_else(|| {
            m.correlation
                .as_ref()
                .and_then(|c| std::str::from_utf8(c).ok().map(str::to_owned))
        })
        .or_else(|| m.topic.rsplit('/').next().map(str::to_owned))
        .unwrap_or_default()
}

/// One registered request: wait on it with [`wake`](Self::wake). Dropping
/// it unregisters the request, whichever way its attempt ends (reply,
/// timeout, or the caller's future dropped); a reply after that is late.
#[derive(Debug)]
pub(crate) struct Waiter<'a> {
    dispatch: &'a Dispatch,
    id: String,
    rx: oneshot::Receiver<Wake>,
}

impl Waiter<'_> {
    /// The reply, or the news that the connection dropped.
    pub(crate) async fn wake(&mut self) -> Wake {
        match (&mut self.rx).await {
            Ok(wake) => wake,
            // The dispatcher went away: only when the client does.
            Err(_) => Wake::Reply(Err(ClientError::Connection(
                "the client is shutting down".into(),
            ))),
        }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.dispatch.abandon(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;

    fn message(id: &str) -> Message {
        Message {
            topic: format!("maze/assistant_response/s/c/{id}"),
            payload: Bytes::from(format!(
                r#"{{"requestId":"{id}","sessionId":"s","ok":true,"text":"t"}}"#
            )),
            correlation: None,
        }
    }

    fn up() -> Dispatch {
        let d = Dispatch::default();
        d.connected(1);
        d
    }

    fn woken(w: &mut Waiter<'_>) -> Option<Wake> {
        w.rx.try_recv().ok()
    }

    #[test]
    fn replies_are_matched_and_duplicates_strays_and_late_ones_counted() {
        let (d, c) = (up(), Counters::default());
        let mut w = d.register("r1", 1, None).unwrap();
        d.deliver(message("r1"), &c);
        let Some(Wake::Reply(Ok(reply))) = woken(&mut w) else {
            panic!("a reply")
        };
        assert_eq!(reply.text.as_deref(), Some("t"));
        drop(w);
        d.deliver(message("r1"), &c);
        d.deliver(message("nobody"), &c);
        d.deliver(
            Message {
                payload: Bytes::from_static(b"plain text"),
                ..message("r1")
            },
            &c,
        );
        // An attempt that timed out, then its reply.
        drop(d.register("r2", 1, None).unwrap());
        d.deliver(message("r2"), &c);
        d.deliver(message("r2"), &c);
        let s = c.snapshot();
        assert_eq!(
            (s.replies, s.duplicates, s.strays, s.late),
            (1, 2, 2, 1),
            "{s:?}"
        );
    }

    #[test]
    fn request_id_falls_back_to_correlation_then_topic() {
        let (d, c) = (up(), Counters::default());
        let mut by_correlation = d.register("cd", 1, None).unwrap();
        let mut by_topic = d.register("tp", 1, None).unwrap();
        let bare = |topic_id: &str, corr: Option<&'static [u8]>| Message {
            topic: format!("maze/assistant_response/s/c/{topic_id}"),
            payload: Bytes::from_static(br#"{"sessionId":"s","ok":true}"#),
            correlation: corr.map(Bytes::from_static),
        };
        d.deliver(bare("zz", Some(b"cd")), &c);
        d.deliver(bare("tp", None), &c);
        assert!(woken(&mut by_correlation).is_some());
        assert!(woken(&mut by_topic).is_some());
    }

    #[test]
    fn an_unreadable_reply_to_a_waiting_request_is_a_protocol_error() {
        let (d, c) = (up(), Counters::default());
        let mut waiters: Vec<_> = ["u1", "u2", "u3"]
            .into_iter()
            .map(|id| d.register(id, 1, None).unwrap())
            .collect();
        // An error code this version does not know, tied by requestId.
        d.deliver(
            Message {
                topic: "maze/assistant_response/s/c/zz".into(),
                payload: Bytes::from_static(
                    br#"{"requestId":"u1","ok":false,"error":{"code":"brand_new","message":"m"}}"#,
                ),
                correlation: None,
            },
            &c,
        );
        // An error without a message, tied by Correlation Data.
        d.deliver(
            Message {
                topic: "maze/assistant_response/s/c/zz".into(),
                payload: Bytes::from_static(br#"{"ok":false,"error":{"code":"overloaded"}}"#),
                correlation: Some(Bytes::from_static(b"u2")),
            },
            &c,
        );
        // Not JSON at all, tied by the topic.
        d.deliver(
            Message {
                topic: "maze/assistant_response/s/c/u3".into(),
                payload: Bytes::from_static(b"Error: something"),
                correlation: None,
            },
            &c,
        );
        for w in &mut waiters {
            let wake = woken(w).expect("the caller hears of it");
            assert!(
                matches!(wake, Wake::Reply(Err(ClientError::Protocol(_)))),
                "{wake:?}"
            );
        }
        let s = c.snapshot();
        assert_eq!((s.strays, s.replies), (0, 3));
    }

    #[test]
    fn a_lost_connection_interrupts_the_waiters_and_their_replies_are_strays() {
        let (d, c) = (up(), Counters::default());
        let mut a = d.register("a", 1, None).unwrap();
        let mut b = d.register("b", 1, None).unwrap();
        assert_eq!(d.lost(), 2);
        assert!(matches!(woken(&mut a), Some(Wake::Interrupted)));
        assert!(matches!(woken(&mut b), Some(Wake::Interrupted)));
        // Nothing registers while the connection is down, nor for a
        // connection that is gone.
        assert!(d.register("x", 1, None).is_none());
        d.connected(2);
        assert!(d.register("x", 1, None).is_none());
        let mut resent = d.register("a2", 2, None).unwrap();
        // The replaced id's reply is a stray; the new id's is the reply.
        d.deliver(message("a"), &c);
        d.deliver(message("a2"), &c);
        assert!(matches!(woken(&mut resent), Some(Wake::Reply(Ok(_)))));
        drop((a, b));
        let s = c.snapshot();
        assert_eq!((s.replies, s.strays, s.late), (1, 1, 0), "{s:?}");
    }

    #[test]
    fn deltas_go_to_their_streamed_request_and_only_the_final_reply_ends_it() {
        let (d, c) = (up(), Counters::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut w = d.register("s1", 1, Some(tx)).unwrap();
        let mut plain = d.register("p1", 1, None).unwrap();
        let delta = |id: &str, seq: u32, text: &str| Message {
            topic: format!("maze/assistant_response/s/c/{id}"),
            payload: Bytes::from(format!(
                r#"{{"requestId":"{id}","sessionId":"s","seq":{seq},"delta":"{text}"}}"#
            )),
            correlation: None,
        };
        d.deliver(delta("s1", 0, "The maze "), &c);
        d.deliver(delta("s1", 1, "has two exits."), &c);
        // A delta for a request that does not stream, and for nobody.
        d.deliver(delta("p1", 0, "x"), &c);
        d.deliver(delta("zz", 0, "x"), &c);
        assert!(woken(&mut w).is_none() && woken(&mut plain).is_none());
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got.iter()
                .map(|d| (d.seq, d.delta.as_str()))
                .collect::<Vec<_>>(),
            [(0, "The maze "), (1, "has two exits.")]
        );
        d.deliver(message("s1"), &c);
        assert!(matches!(woken(&mut w), Some(Wake::Reply(Ok(_)))));
        let s = c.snapshot();
        assert_eq!((s.deltas, s.replies, s.strays), (4, 1, 0), "{s:?}");
    }

    #[test]
    fn finished_ids_are_bounded() {
        let mut book = Book::default();
        for i in 0..REMEMBERED_IDS + 10 {
            book.finish(i.to_string(), Fate::Answered);
        }
        assert_eq!(book.finished.len(), REMEMBERED_IDS);
        assert!(!book.finished.contains_key("0"));
    }
}
