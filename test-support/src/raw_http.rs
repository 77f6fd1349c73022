//! A backend written on raw sockets, for connection-level faults that an
//! HTTP framework will not produce: closing a connection after reading a
//! request, without a response.
//!
//! Two kinds:
//! - [`ResetMode::Every`]: every connection is closed once its request is
//!   read (a proxy with no healthy upstream, a server that crashes on each
//!   request);
//! - [`ResetMode::Reused`]: each connection answers its first request with
//!   keep-alive, then is closed when a second request arrives on it: only
//!   stale pooled connections fail, fresh ones always answer;
//! - [`ResetMode::StallAfterHead`]: chat requests get a 200 head and an
//!   event stream that never sends anything (health and models answer);
//! - [`ResetMode::Silent`]: every connection is accepted and its request
//!   read, and nothing is ever answered;
//! - [`ResetMode::EndlessError`]: chat requests get an error status and a
//!   body that never ends (health and models answer);
//! - [`ResetMode::EndlessModels`]: `GET /models` gets a 200 and a JSON
//!   list that never ends (health and chat answer).
//!
//! An endless body is written as fast as the client reads it until the
//! client hangs up, or [`ENDLESS_BOUND`] bytes (a bound for the fake only:
//! a client that reads that much has already failed its test).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Which connections are closed unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetMode {
    Every,
    Reused,
    StallAfterHead,
    Silent,
    /// Chat requests are answered with this status and an endless
    /// `text/plain` body (no length, `connection: close`).
    EndlessError(u16),
    /// `GET /models` is answered 200 with an endless JSON model list.
    EndlessModels,
}

/// The most an endless body writes before the fake gives up: 256 MiB.
pub const ENDLESS_BOUND: usize = 256 * 1024 * 1024;

/// One endless body as it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndlessBody {
    /// Body bytes written (accepted by the socket) before it ended.
    pub sent: usize,
    /// The client hung up (else the fake reached [`ENDLESS_BOUND`]).
    pub cut: bool,
}

/// The running server; stops when dropped.
pub struct RawBackend {
    port: u16,
    /// Chat requests read (answered or not).
    chat: Arc<AtomicUsize>,
    /// Chat requests closed without an answer.
    resets: Arc<AtomicUsize>,
    /// Endless bodies that have ended, in the order they did.
    bodies: Arc<Mutex<Vec<EndlessBody>>>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start(mode: ResetMode) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let chat = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (c, r, b) = (chat.clone(), resets.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(sock, mode, c.clone(), r.clone(), b.clone()));
            }
        });
        RawBackend {
            port,
            chat,
            resets,
            bodies,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn chat_calls(&self) -> usize {
        self.chat.load(Ordering::SeqCst)
    }

    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }

    /// The endless bodies that have ended so far (the client hung up or
    /// the fake's bound was reached); one still being written is not in.
    pub fn endless_bodies(&self) -> Vec<EndlessBody> {
        self.bodies.lock().unwrap().clone()
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head and a `Content-Length` body) from `sock`,
/// keeping what follows it in `buf`; its head, or `None` at EOF. Shared by
/// the raw backends of the tests.
pub async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return Some(head);
            }
        }
        let mut chunk = [0u8; 8192];
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve(
    mut sock: TcpStream,
    mode: ResetMode,
    chat: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<EndlessBody>>>,
) {
    let mut buf = Vec::new();
    let mut served = 0;
    while let Some(head) = read_request(&mut sock, &mut buf).await {
        let is_chat = head.starts_with("POST") && head.contains("/chat/completions");
        if is_chat {
            chat.fetch_add(1, Ordering::SeqCst);
        }
        let endless = match mode {
            ResetMode::EndlessError(status) if is_chat => Some((
                format!(
                    "HTTP/1.1 {status} Oops\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
                ),
                String::new(),
                "x".repeat(1000),
            )),
            ResetMode::EndlessModels if head.starts_with("GET") && head.contains("/models") => Some((
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                    .to_owned(),
                "{\"object\":\"list\",\"data\":[".to_owned(),
                "{\"id\":\"test-model\",\"object\":\"model\"},".repeat(25),
            )),
            _ => None,
        };
        if let Some((head, prefix, unit)) = endless {
            let body = endless_body(&mut sock, &head, &prefix, &unit).await;
            bodies.lock().unwrap().push(body);
            return;
        }
        if mode == ResetMode::Silent {
            let mut rest = [0u8; 1024];
            while matches!(sock.read(&mut rest).await, Ok(n) if n > 0) {}
            return;
        }
        if is_chat && mode == ResetMode::StallAfterHead {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            // Hold the connection open, saying nothing, until the client
            // goes away.
            let mut rest = [0u8; 1024];
            while matches!(sock.read(&mut rest).await, Ok(n) if n > 0) {}
            return;
        }
        if mode == ResetMode::Every || (mode == ResetMode::Reused && served > 0) {
            if is_chat {
                resets.fetch_add(1, Ordering::SeqCst);
            }
            // Dropping the socket closes it with the request unanswered.
            return;
        }
        served += 1;
        let body = if head.contains("/models") {
            "{\"object\":\"list\",\"data\":[{\"id\":\"test-model\",\"object\":\"model\"}]}"
        } else if is_chat {
            concat!(
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"fresh\"},\"finish_reason\":\"stop\"}]}\n\n",
                "data: [DONE]\n\n"
            )
        } else {
            ""
        };
        let content_type = if is_chat {
            "text/event-stream"
        } else if head.contains("/models") {
            "application/json"
        } else {
            "text/plain"
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n{body}",
            body.len()
        );
        if sock.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Writes `head`, then `prefix` and `unit` over and over as fast as the
/// client reads, until it hangs up or [`ENDLESS_BOUND`] is reached.
async fn endless_body(sock: &mut TcpStream, head: &str, prefix: &str, unit: &str) -> EndlessBody {
    let mut sent = 0;
    if sock.write_all(head.as_bytes()).await.is_err() {
        return EndlessBody { sent, cut: true };
    }
    if sock.write_all(prefix.as_bytes()).await.is_err() {
        return EndlessBody { sent, cut: true };
    }
    sent += prefix.len();
    // Units batched to about 64 KiB a write.
    let chunk = unit.repeat((64 * 1024 / unit.len()).max(1));
    while sent < ENDLESS_BOUND {
        if sock.write_all(chunk.as_bytes()).await.is_err() {
            return EndlessBody { sent, cut: true };
        }
        sent += chunk.len();
    }
    EndlessBody { sent, cut: false }
}
