//! What happens to one chat request besides a normal completion: a test's
//! scripted behaviour, or a failure drawn at random from [`Faults`].

use std::time::Duration;

use crate::config::Faults;

/// One scripted behaviour, consumed per `POST /v1/chat/completions` (FIFO).
/// When the script is empty the default reply (see
/// [`SimBuilder::reply_with`](crate::SimBuilder::reply_with)) is used.
#[derive(Debug, Clone)]
pub enum Scripted {
    /// 200 with this assistant text (streamed as SSE if the request asks).
    Reply(String),
    /// Error status with vLLM's error JSON.
    Status(u16, String),
    /// Same as `Status` plus a `Retry-After: <secs>` header.
    StatusRetryAfter(u16, String, u64),
    /// 400 with vLLM's context-length message, param `"messages"`.
    ContextLength,
    /// Never answers; the handler stays pending until the client goes away
    /// (which is counted by [`Sim::disconnected`](crate::Sim::disconnected)).
    Stall,
    /// Close the TCP connection without writing any response bytes. A
    /// hyper/reqwest client sees an error such as "connection closed before
    /// message completed" (`hyper::Error::IncompleteMessage`). Not counted as
    /// a disconnect.
    Reset,
    /// Answer with this text after a delay (`tokio::time::sleep`, so paused
    /// time works).
    Delay(Duration, String),
    /// A 200 event stream that starts, then reports an error in-band (what
    /// vLLM does when generation fails after the headers went out):
    /// `data: {"error":{"object":"error","message":..,"type":..,"code":N}}`.
    StreamError(u16, String),
}

/// A failure injected by [`Faults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer at once with this status.
    Error(u16),
    /// Hold the request until the client leaves.
    Stall,
    /// Close the connection without a response byte.
    Reset,
    /// Fail halfway through the generation.
    Generation,
}

impl Fault {
    /// The failure (if any) that a uniform draw `u` in `[0, 1)` selects: the
    /// rates are laid end to end on `[0, 1)`.
    pub fn pick(faults: &Faults, u: f64) -> Option<Fault> {
        let mut edge = 0.0;
        for (rate, fault) in [
            (faults.error_rate, Fault::Error(faults.error_status)),
            (faults.stall_rate, Fault::Stall),
            (faults.reset_rate, Fault::Reset),
            (faults.generation_error_rate, Fault::Generation),
        ] {
            edge += rate;
            if u < edge {
                return Some(fault);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_laid_end_to_end() {
        let f = Faults {
            error_rate: 0.1,
            error_status: 503,
            stall_rate: 0.2,
            reset_rate: 0.0,
            generation_error_rate: 0.3,
        };
        assert_eq!(Fault::pick(&f, 0.0), Some(Fault::Error(503)));
        assert_eq!(Fault::pick(&f, 0.09), Some(Fault::Error(503)));
        assert_eq!(Fault::pick(&f, 0.1), Some(Fault::Stall));
        assert_eq!(Fault::pick(&f, 0.35), Some(Fault::Generation));
        assert_eq!(Fault::pick(&f, 0.7), None);
        assert_eq!(Fault::pick(&Faults::default(), 0.0), None);
    }
}
