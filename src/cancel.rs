//! Cancelling a request (protocol v1.1): `{project}/cancel` (with a device
//! identity, `{project}/cancel/{deviceId}`) carries
//! `{"sessionId":"s1","requestId":"r1"}`; `requestId` is optional (then
//! whatever the session has queued or running).
//!
//! Every admitted request registers a token here, held in the request
//! itself and unregistered when it is dropped. Ingress cancels tokens
//! without awaiting anything (the poll loop only hands off); the worker
//! sees the token: a queued request is answered `cancelled` without
//! calling the backend, a running one has its backend call dropped (vLLM
//! then aborts the generation) and is answered `cancelled` with the text
//! so far. A cancel for nothing in flight is ignored and counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use vllm_chat::protocol::is_valid_session_id;

use crate::request::SessionKey;

/// The session's requests that can be cancelled, by request id.
type Entries = Vec<(u64, Option<Box<str>>, CancellationToken)>;

/// Tokens of the admitted requests of this instance.
#[derive(Debug, Default)]
pub struct Cancels {
    map: Mutex<HashMap<SessionKey, Entries>>,
    next: std::sync::atomic::AtomicU64,
}

/// A request's registration; unregisters when dropped.
#[derive(Debug)]
pub struct Registered {
    cancels: Arc<Cancels>,
    key: SessionKey,
    id: u64,
    pub token: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self
            .cancels
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entries) = map.get_mut(&self.key) {
            entries.retain(|(id, _, _)| *id != self.id);
            if entries.is_empty() {
                map.remove(&self.key);
            }
        }
    }
}

impl Cancels {
    /// Registers an admitted request.
    pub fn register(self: &Arc<Self>, key: &SessionKey, request_id: Option<&str>) -> Registered {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = CancellationToken::new();
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .push((id, request_id.map(Box::from), token.clone()));
        Registered {
            cancels: self.clone(),
            key: key.clone(),
            id,
            token,
        }
    }

    /// Cancels `key`'s request `request_id` (any of them if `None`);
    /// how many were cancelled.
    pub fn cancel(&self, key: &SessionKey, request_id: Option<&str>) -> usize {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entries) = map.get(key) else {
            return 0;
        };
        let mut n = 0;
        for (_, rid, token) in entries {
            if request_id.is_none() || rid.as_deref() == request_id {
                if !token.is_cancelled() {
                    n += 1;
                }
                token.cancel();
            }
        }
        n
    }
}

/// A cancel message's payload.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelBody {
    session_id: String,
    #[serde(default)]
    request_id: Option<String>,
}

/// Parses a cancel payload: the session id and the request id, if any.
/// `None` for anything malformed (a cancel has no reply to carry an error).
pub fn parse(payload: &[u8]) -> Option<(String, Option<String>)> {
    if payload.len() > 4096 {
        return None;
    }
    let body: CancelBody = serde_json::from_slice(payload).ok()?;
    if !is_valid_session_id(&body.session_id) {
        return None;
    }
    if body
        .request_id
        .as_ref()
        .is_some_and(|r| r.is_empty() || r.len() > 256)
    {
        return None;
    }
    Some((body.session_id, body.request_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> SessionKey {
        SessionKey {
            project: Arc::from("p"),
            device: None,
            session: s.into(),
            ephemeral: false,
        }
    }

    #[test]
    fn cancel_reaches_the_named_request_and_forgets_finished_ones() {
        let c = Arc::new(Cancels::default());
        let a = c.register(&key("s"), Some("r1"));
        let b = c.register(&key("s"), Some("r2"));
        assert_eq!(c.cancel(&key("s"), Some("r2")), 1);
        assert!(!a.token.is_cancelled() && b.token.is_cancelled());
        assert_eq!(c.cancel(&key("other"), None), 0, "nothing in flight");
        assert_eq!(c.cancel(&key("s"), None), 1, "the rest of the session");
        drop((a, b));
        assert_eq!(c.cancel(&key("s"), None), 0);
        assert!(c.map.lock().unwrap().is_empty());
    }

    #[test]
    fn cancel_payloads() {
        assert_eq!(
            parse(br#"{"sessionId":"s1","requestId":"r1"}"#),
            Some(("s1".into(), Some("r1".into())))
        );
        assert_eq!(parse(br#"{"sessionId":"s1"}"#), Some(("s1".into(), None)));
        for bad in [
            &b"nope"[..],
            br#"{"requestId":"r"}"#,
            br#"{"sessionId":"a b"}"#,
        ] {
            assert_eq!(parse(bad), None);
        }
    }
}
