//! The backend circuit's state as the rest of the daemon sees it.
//!
//! The breaker ([`crate::backend::breaker`]) decides it; the status topic,
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
