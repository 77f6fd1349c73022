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
//!   read, and nothing is ever answered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
}

/// The running server; stops when dropped.
pub struct RawBackend {
    port: u16,
    /// Chat requests read (answered or not).
    chat: Arc<AtomicUsize>,
    /// Chat requests closed without an answer.
    resets: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start(mode: ResetMode) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let chat = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let (c, r) = (chat.clone(), resets.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(sock, mode, c.clone(), r.clone()));
            }
        });
        RawBackend {
            port,
            chat,
            resets,
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
) {
    let mut buf = Vec::new();
    let mut served = 0;
    while let Some(head) = read_request(&mut sock, &mut buf).await {
        let is_chat = head.starts_with("POST") && head.contains("/chat/completions");
        if is_chat {
            chat.fetch_add(1, Ordering::SeqCst);
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
