//! The egress stage: turns [`Outbound`] replies into MQTT publishes, then
//! acknowledges the request they answer.
//!
//! One task owns publishing, so a reply always goes out before its
//! request's PUBACK (both go through rumqttc's request channel in order):
//! if the daemon dies in between, the broker redelivers the request and the
//! device may get a duplicate reply, never none (at-least-once).
//!
//! Stages hand replies over with [`Egress::send`] (awaits room: workers and
//! admission may wait) or [`Egress::try_send`] (ingress, which must never
//! wait). The channel is bounded. When it is full for `try_send`, anything
//! that acknowledges a QoS 1 request goes to an overflow channel instead:
//! a request left unacknowledged holds one of the broker's in-flight slots
//! until the next reconnect, and enough of them leave the daemon connected
//! but deaf. The overflow needs no bound of its own: each entry settles a
//! distinct unacknowledged QoS 1 delivery, and the broker never has more
//! of those out to us than our Receive Maximum. Only a QoS 0 reply, which
//! nothing redelivers anyway, is dropped (and counted) when egress is full.

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vllm_chat::protocol::{
    error_text, ReplyError, ReplyFormat, ERROR_USER_PROPERTY, JSON_CONTENT_TYPE,
};

use crate::request::{AckToken, Outbound, ReplyBody, ReplyTo};
use crate::telemetry::{Event, Stats};
use std::sync::Arc;

/// Handle for handing replies to egress; cheap to clone.
#[derive(Debug, Clone)]
pub struct Egress {
    tx: mpsc::Sender<Outbound>,
    /// Acknowledging hand-offs that found `tx` full (see the module doc
    /// for why this needs no bound of its own).
    overflow: mpsc::UnboundedSender<Outbound>,
    stats: Arc<Stats>,
}

/// The receiving end, for [`run`].
#[derive(Debug)]
pub struct EgressRx {
    rx: mpsc::Receiver<Outbound>,
    overflow: mpsc::UnboundedReceiver<Outbound>,
}

impl EgressRx {
    /// The next hand-off (overflowed ones first: they are the oldest
    /// waiting); `None` once closed and drained.
    pub async fn recv(&mut self) -> Option<Outbound> {
        tokio::select! {
            biased;
            Some(out) = self.overflow.recv() => Some(out),
            out = self.rx.recv() => match out {
                Some(out) => Some(out),
                None => self.overflow.recv().await,
            },
        }
    }

    /// Takes nothing new; what is queued can still be received.
    pub fn close(&mut self) {
        self.rx.close();
        self.overflow.close();
    }
}

impl Egress {
    /// A handle and the receiving end for [`run`].
    pub fn channel(capacity: usize, stats: Arc<Stats>) -> (Egress, EgressRx) {
        let (tx, rx) = mpsc::channel(capacity);
        let (overflow, overflow_rx) = mpsc::unbounded_channel();
        (
            Egress {
                tx,
                overflow,
                stats,
            },
            EgressRx {
                rx,
                overflow: overflow_rx,
            },
        )
    }

    /// Hands over a reply, waiting for room.
    pub async fn send(&self, out: Outbound) {
        if self.tx.send(out).await.is_err() {
            self.stats.emit(Event::EgressDropped);
        }
    }

    /// Hands over a message if there is room now; `false` if not (a
    /// streamed answer's delta: the worker keeps reading the backend and
    /// offers the text again later, coalesced, rather than wait or drop).
    pub fn offer(&self, out: Outbound) -> bool {
        self.tx.try_send(out).is_ok()
    }

    /// Hands over a reply without waiting. On a full channel, anything
    /// that acknowledges a request overflows (it is never dropped); a QoS 0
    /// reply is dropped and counted.
    pub fn try_send(&self, out: Outbound) {
        match self.tx.try_send(out) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(out)) if out.ack.is_some() => {
                if self.overflow.send(out).is_err() {
                    self.stats.emit(Event::EgressDropped);
                }
            }
            Err(_) => self.stats.emit(Event::EgressDropped),
        }
    }
}

fn reply_error(f: &crate::request::Failure) -> ReplyError {
    ReplyError {
        code: f.code,
        message: f.message.clone(),
        retry_after_ms: f.retry_after.map(|d| d.as_millis().max(1) as u64),
    }
}

/// Encodes a reply: payload and MQTT v5 properties.
pub fn encode(to: &ReplyTo, body: &ReplyBody) -> (Bytes, PublishProperties) {
    let mut props = PublishProperties {
        correlation_data: to.correlation.clone(),
        ..Default::default()
    };
    if let ReplyBody::Failure(f) | ReplyBody::Partial { failure: f, .. } = body {
        props
            .user_properties
            .push((ERROR_USER_PROPERTY.to_owned(), f.code.as_str().to_owned()));
    }
    if let ReplyBody::Delta { seq, text } = body {
        // Deltas are JSON whatever `format` says (a text-mode device never
        // asks for streaming).
        props.content_type = Some(JSON_CONTENT_TYPE.to_owned());
        props.payload_format_indicator = Some(1);
        let delta = vllm_chat::protocol::Delta {
            request_id: to.request_id.clone(),
            session_id: to.session_id.clone(),
            client_id: to.client_id.clone(),
            seq: *seq,
            delta: text.clone(),
        };
        return (
            Bytes::from(serde_json::to_vec(&delta).unwrap_or_default()),
            props,
        );
    }
    let payload = match to.format {
        ReplyFormat::Text => match body {
            ReplyBody::Answer { answer, .. } => Bytes::from(answer.text.clone()),
            ReplyBody::Failure(f) | ReplyBody::Partial { failure: f, .. } => {
                Bytes::from(error_text(f.code, &f.message))
            }
            ReplyBody::Delta { text, .. } => Bytes::from(text.clone()),
        },
        ReplyFormat::Json => {
            props.content_type = Some(JSON_CONTENT_TYPE.to_owned());
            props.payload_format_indicator = Some(1);
            let mut reply = vllm_chat::protocol::Reply {
                request_id: to.request_id.clone(),
                session_id: to.session_id.clone(),
                client_id: to.client_id.clone(),
                ok: false,
                text: None,
                finish_reason: None,
                usage: None,
                latency_ms: None,
                error: None,
                seq: to.stream.map(|_| to.seq.unwrap_or(0)),
                done: to.stream.map(|_| true),
            };
            match body {
                ReplyBody::Answer { answer, latency } => {
                    reply.ok = true;
                    reply.text = Some(answer.text.clone());
                    reply.finish_reason = answer.finish_reason.clone();
                    reply.usage = answer.usage;
                    reply.latency_ms = Some(latency.as_millis() as u64);
                }
                ReplyBody::Failure(f) => reply.error = Some(reply_error(f)),
                ReplyBody::Partial { failure, text } => {
                    reply.error = Some(reply_error(failure));
                    reply.text = Some(text.clone());
                }
                ReplyBody::Delta { .. } => {}
            }
            // Serialising plain strings and numbers cannot fail.
            Bytes::from(serde_json::to_vec(&reply).unwrap_or_default())
        }
    };
    (payload, props)
}

fn ack_packet(ack: AckToken) -> Publish {
    let mut p = Publish::new("", QoS::AtLeastOnce, Bytes::new(), None);
    p.pkid = ack.pkid;
    p
}

/// Publishes replies and acks until `close` is cancelled and the channel is
/// drained.
pub async fn run(client: AsyncClient, mut rx: EgressRx, reply_qos: QoS, close: CancellationToken) {
    loop {
        let out = tokio::select! {
            out = rx.recv() => out,
            _ = close.cancelled() => {
                // Take nothing new; publish what is already in the channel.
                rx.close();
                rx.recv().await
            }
        };
        let Some(out) = out else { break };
        if let Some((to, body)) = &out.reply {
            let (payload, props) = encode(to, body);
            let sent = if props != PublishProperties::default() {
                client
                    .publish_with_properties(to.topic.clone(), reply_qos, false, payload, props)
                    .await
            } else {
                client
                    .publish(to.topic.clone(), reply_qos, false, payload)
                    .await
            };
            if let Err(e) = sent {
                // The event loop is gone: nothing more can be sent.
                tracing::error!(error = %e, "cannot publish reply; stopping egress");
                break;
            }
        }
        if let Some(ack) = out.ack {
            if let Err(e) = client.ack(&ack_packet(ack)).await {
                tracing::error!(error = %e, "cannot acknowledge request; stopping egress");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Answer, Failure};
    use std::time::Duration;
    use vllm_chat::protocol::ErrorCode;

    fn to(format: ReplyFormat) -> ReplyTo {
        ReplyTo {
            stream: None,
            seq: None,
            topic: "p/assistant_response/s".into(),
            format,
            correlation: Some(Bytes::from_static(b"c1")),
            session_id: "s".into(),
            request_id: Some("r".into()),
            client_id: None,
        }
    }

    #[tokio::test]
    async fn acknowledgements_are_never_dropped_when_egress_is_full() {
        let stats = Arc::new(Stats::new());
        let (egress, mut rx) = Egress::channel(1, stats);
        let reply = |ack: Option<u16>| Outbound {
            reply: Some((
                to(ReplyFormat::Text),
                ReplyBody::Failure(Failure::fixed(ErrorCode::Overloaded)),
            )),
            ack: ack.map(|pkid| AckToken { pkid }),
        };
        egress.try_send(reply(Some(1))); // fills the channel
        egress.try_send(reply(Some(2))); // overflows, with its reply
        egress.try_send(Outbound {
            reply: None,
            ack: Some(AckToken { pkid: 3 }),
        });
        egress.try_send(reply(None)); // QoS 0: dropped
        rx.close();
        let mut acks = vec![];
        while let Some(out) = rx.recv().await {
            assert!(out.ack.is_some(), "the QoS 0 reply was dropped");
            acks.push(out.ack.unwrap().pkid);
        }
        acks.sort();
        assert_eq!(acks, vec![1, 2, 3]);
    }

    #[test]
    fn text_and_json_encodings() {
        let busy = ReplyBody::Failure(Failure::fixed(ErrorCode::SessionBusy));
        let (p, props) = encode(&to(ReplyFormat::Text), &busy);
        assert_eq!(
            &p[..],
            b"Please wait, your previous message is still being processed..."
        );
        assert_eq!(props.correlation_data.as_deref(), Some(&b"c1"[..]));
        assert_eq!(
            props.user_properties,
            vec![("error".into(), "session_busy".into())]
        );
        assert_eq!(props.content_type, None);

        let ok = ReplyBody::Answer {
            answer: Answer {
                text: "hi".into(),
                finish_reason: Some("stop".into()),
                usage: None,
            },
            latency: Duration::from_millis(12),
        };
        let (p, props) = encode(&to(ReplyFormat::Json), &ok);
        assert_eq!(
            std::str::from_utf8(&p).unwrap(),
            r#"{"requestId":"r","sessionId":"s","ok":true,"text":"hi","finishReason":"stop","latencyMs":12}"#
        );
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
        assert!(props.user_properties.is_empty());

        let limited = ReplyBody::Failure(
            Failure::fixed(ErrorCode::RateLimited).retry_after(Duration::from_millis(4200)),
        );
        let (p, _) = encode(&to(ReplyFormat::Json), &limited);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["error"]["retryAfterMs"], 4200);
        assert_eq!(v["error"]["code"], "rate_limited");
    }
}
