//! The backend circuit's state as the rest of the daemon sees it.
//!
//! The breaker ([`crate::breaker`]) decides it; the status topic,
//! the stats and the metrics report it. It lives here, not in the breaker,
//! so the reporting stages depend on this small domain type instead of
//! reaching into the backend stage.

use serde::Serialize;

/// The circuit's state, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

/// A backend's line in the retained status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackendStatus {
    pub url: String,
    pub circuit: Circuit,
}

/// The backends' circuits as the reporting stages see them: the pool's
/// overall state and each backend's, and a receiver per backend that
/// changes with its circuit.
#[derive(Clone)]
pub struct Circuits {
    #[allow(clippy::type_complexity)]
    pub now: std::sync::Arc<dyn Fn() -> (Circuit, Vec<BackendStatus>) + Send + Sync>,
    pub changes: Vec<tokio::sync::watch::Receiver<Circuit>>,
}

impl std::fmt::Debug for Circuits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Circuits")
            .field("now", &(self.now)())
            .finish()
    }
}

impl Circuits {
    /// Resolves when any backend's circuit changes; `false` once they are
    /// all gone.
    pub async fn changed(&mut self) -> bool {
        if self.changes.is_empty() {
            return false;
        }
        let (r, _, _) = futures_util::future::select_all(
            self.changes.iter_mut().map(|rx| Box::pin(rx.changed())),
        )
        .await;
        for rx in &mut self.changes {
            rx.borrow_and_update();
        }
        r.is_ok()
    }
}
