//! Streamed answers (protocol v1.1, `"stream": true`): the text the backend
//! generates goes to the device as deltas while it is generated, then the
//! final reply carries the whole text, `done` and the number of deltas.
//!
//! Deltas are coalesced: with `streamBy: "time"`, at most one per
//! `stream_interval` (the first at once, so an answer starts streaming as
//! soon as its first token is out); with `"sentence"`, cut after a sentence
//! end, so a delta never splits a sentence (the last one may be a
//! fragment). Coalescing is decided as text arrives, never on a timer: a
//! backend that produces nothing produces no delta.
//!
//! A delta is *offered* to egress, never awaited: when egress has no room
//! (the broker is slow) the text stays pending and goes with the next
//! delta, so the worker keeps reading the backend's stream and the text
//! held here is bounded by the answer's own cap (`max_reply_bytes`). No
//! `seq` is spent on a delta that did not go out, so `seq` has no gaps.
//!
//! A JSON request that does not stream gets a silent [`Streamer`]
//! ([`Streamer::silent`]): it sends nothing and only keeps the text, so
//! that a cancel can be answered with what was generated so far, through
//! the same path (attempts restart it) as a streamed one.

use std::time::Duration;

use tokio::time::Instant;

use crate::mqtt::egress::Egress;
use crate::request::{Outbound, ReplyBody, ReplyTo, StreamBy};

/// One streamed request's deltas.
pub struct Streamer<'a> {
    egress: &'a Egress,
    to: &'a ReplyTo,
    /// `None`: silent, the text is kept and no delta sent.
    by: Option<StreamBy>,
    interval: Duration,
    pending: String,
    /// Everything generated so far (for a final reply that ends early).
    text: String,
    sent: u32,
    last: Option<Instant>,
}

impl<'a> Streamer<'a> {
    pub fn new(egress: &'a Egress, to: &'a ReplyTo, by: StreamBy, interval: Duration) -> Self {
        Self {
            by: Some(by),
            interval,
            ..Self::silent(egress, to)
        }
    }

    /// One that sends no delta and only keeps the text generated so far.
    pub fn silent(egress: &'a Egress, to: &'a ReplyTo) -> Self {
        Self {
            egress,
            to,
            by: None,
            interval: Duration::ZERO,
            pending: String::new(),
            text: String::new(),
            sent: 0,
            last: None,
        }
    }

    /// Deltas sent so far (the final reply's `seq`).
    pub fn sent(&self) -> u32 {
        self.sent
    }

    /// The text generated so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// A new attempt: unless a delta went out (then there is no retry),
    /// what the last one generated is forgotten.
    pub fn restart(&mut self) {
        if self.sent == 0 {
            self.pending.clear();
            self.text.clear();
            self.last = None;
        }
    }

    /// More generated text.
    pub fn push(&mut self, text: &str) {
        self.text.push_str(text);
        let Some(by) = self.by else {
            return;
        };
        self.pending.push_str(text);
        let cut = match by {
            StreamBy::Time => {
                let due = self.last.is_none_or(|t| t.elapsed() >= self.interval);
                if due {
                    self.pending.len()
                } else {
                    0
                }
            }
            StreamBy::Sentence => sentence_cut(&self.pending),
        };
        self.offer(cut);
    }

    /// The generation ended: what is pending goes out as the last delta,
    /// waiting for room if needed (the backend is done; the final reply
    /// must come after every delta).
    pub async fn finish(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.pending);
        self.egress.send(self.delta(text)).await;
        self.sent += 1;
    }

    fn delta(&self, text: String) -> Outbound {
        Outbound {
            reply: Some((
                self.to.clone(),
                ReplyBody::Delta {
                    seq: self.sent,
                    text,
                },
            )),
            ack: None,
        }
    }

    fn offer(&mut self, cut: usize) {
        if cut == 0 {
            return;
        }
        let text = self.pending[..cut].to_owned();
        if self.egress.offer(self.delta(text)) {
            self.pending.drain(..cut);
            self.sent += 1;
            self.last = Some(Instant::now());
        }
    }
}

/// Where a delta of `text` may end in sentence mode: after the last
/// sentence end (`.`, `!`, `?`, `…` or their CJK forms, with any closing
/// quotes or brackets, followed by whitespace) and that whitespace; 0 if
/// no sentence has ended yet.
pub fn sentence_cut(text: &str) -> usize {
    let mut cut = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        let end = matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？');
        if !end {
            continue;
        }
        // Closing quotes or brackets belong to the sentence.
        while let Some(&(_, q)) = chars.peek() {
            if matches!(q, '"' | '\'' | ')' | ']' | '”' | '’' | '»') {
                chars.next();
            } else {
                break;
            }
        }
        let cjk = matches!(c, '。' | '！' | '？');
        match chars.peek() {
            Some(&(i, w)) if w.is_whitespace() => {
                // Take the whitespace with this sentence.
                let mut j = i;
                while let Some(&(k, w)) = chars.peek() {
                    if !w.is_whitespace() {
                        break;
                    }
                    j = k + w.len_utf8();
                    chars.next();
                }
                cut = j;
            }
            Some(&(i, _)) if cjk => cut = i,
            _ => {}
        }
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_end_at_punctuation_and_space() {
        assert_eq!(sentence_cut("Hello there"), 0);
        assert_eq!(
            sentence_cut("Hello there."),
            0,
            "the sentence may go on: 3.14"
        );
        assert_eq!(sentence_cut("Hi. How"), "Hi. ".len());
        assert_eq!(
            sentence_cut("One. Two! Three? Fo"),
            "One. Two! Three? ".len()
        );
        assert_eq!(sentence_cut("Pi is 3.14 and"), 0);
        assert_eq!(
            sentence_cut("He said \"go.\" Then"),
            "He said \"go.\" ".len()
        );
        assert_eq!(sentence_cut("好。然后"), "好。".len());
    }

    fn reply_to(stream: Option<StreamBy>) -> ReplyTo {
        ReplyTo {
            topic: "maze/assistant_response/s".into(),
            format: vllm_chat::protocol::ReplyFormat::Json,
            stream,
            seq: None,
            correlation: None,
            session_id: "s".into(),
            request_id: None,
            client_id: None,
        }
    }

    /// The deltas egress holds, in order: (seq, text).
    async fn deltas(rx: &mut crate::mqtt::egress::EgressRx, n: usize) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        for _ in 0..n {
            match rx.recv().await.and_then(|o| o.reply) {
                Some((_, ReplyBody::Delta { seq, text })) => out.push((seq, text)),
                other => panic!("not a delta: {other:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn a_full_egress_never_blocks_the_reader_and_loses_no_text() {
        // Room for one message, and nobody reading yet: a broker that
        // has fallen behind.
        let stats = std::sync::Arc::new(crate::telemetry::Stats::new());
        let (egress, mut rx) = Egress::channel(1, stats);
        let to = reply_to(Some(StreamBy::Time));
        let mut s = Streamer::new(&egress, &to, StreamBy::Time, Duration::ZERO);
        // `push` is not async: the backend's stream is read on, whatever
        // egress does. The first delta takes the room; the rest waits.
        for piece in ["The ", "maze ", "has "] {
            s.push(piece);
        }
        assert_eq!(s.sent(), 1);
        assert_eq!(deltas(&mut rx, 1).await, [(0, "The ".to_owned())]);
        // Room again: what waited goes as one delta, with the next text.
        s.push("two ");
        s.push("exits.");
        // The last delta waits for room (the final reply must come after
        // it): it goes once egress reads again.
        let (_, got) = tokio::join!(s.finish(), deltas(&mut rx, 2));
        assert_eq!(
            got,
            [(1, "maze has two ".to_owned()), (2, "exits.".to_owned())]
        );
        assert_eq!((s.sent(), s.text()), (3, "The maze has two exits."));
    }

    #[tokio::test]
    async fn a_silent_streamer_sends_nothing_and_keeps_the_text_of_its_attempt() {
        let stats = std::sync::Arc::new(crate::telemetry::Stats::new());
        let (egress, _rx) = Egress::channel(1, stats);
        let to = reply_to(None);
        let mut s = Streamer::silent(&egress, &to);
        s.push("an attempt that failed");
        s.restart();
        s.push("Two ");
        s.push("exits.");
        s.finish().await;
        assert_eq!((s.sent(), s.text()), (0, "Two exits."));
        // Egress still has its one place: nothing was offered.
        assert!(egress.offer(Outbound {
            reply: None,
            ack: None
        }));
    }
}
