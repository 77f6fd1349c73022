//! The integration tests' fake vLLM: `vllm-sim` in scripted mode.
//!
//! There is one implementation of the simulated server, the `vllm-sim`
//! crate (`sim/`). This module only keeps the name and the defaults the
//! tests were written against: [`FakeVllm::builder`] is
//! [`vllm_sim::Sim::scripted`] (model `test-model`, no latency, no batching
//! limit, echo replies, every request recorded), and a [`FakeVllm`] derefs
//! to the running [`vllm_sim::Sim`], whose methods (`base_url`, `requests`,
//! `chat_calls`, `push`, `release`, `wait_for_disconnects`, ...) are the
//! fake's.
//!
//! ```ignore
//! let vllm = FakeVllm::builder()
//!     .model("m")
//!     .script(vec![Scripted::Status(503, "busy".into())])
//!     .run()
//!     .await;
//! ```

use std::ops::Deref;
use std::time::Duration;

use serde_json::Value;
use vllm_sim::{Sim, SimBuilder};

// Each test binary uses a different subset (`dead_code` does not cover
// re-exports).
#[allow(unused_imports)]
pub use vllm_sim::{default_reply, split_words, Scripted, CONTEXT_LENGTH_MESSAGE};

/// A running fake vLLM server. Dropping it shuts the server down.
pub struct FakeVllm {
    sim: Sim,
}

/// Builder for [`FakeVllm`]: [`SimBuilder`] with the scripted preset.
pub struct FakeVllmBuilder {
    sim: SimBuilder,
}

impl FakeVllm {
    pub fn builder() -> FakeVllmBuilder {
        FakeVllmBuilder {
            sim: Sim::scripted(),
        }
    }

    /// A fake whose every reply is `text` (a name, to tell backends
    /// apart; a long text, to stream).
    pub async fn answering(text: &'static str) -> FakeVllm {
        Self::builder().reply(text).run().await
    }
}

impl Deref for FakeVllm {
    type Target = Sim;

    fn deref(&self) -> &Sim {
        &self.sim
    }
}

impl FakeVllmBuilder {
    /// Model name served (default `"test-model"`).
    pub fn model(self, name: &str) -> Self {
        self.map(|b| b.model(name))
    }

    /// `/v1/models` returns 503 until `set_available(true)` is called.
    pub fn no_models(self) -> Self {
        self.map(SimBuilder::no_models)
    }

    /// Start with `available = false` (health, models and chat return 503).
    pub fn start_unavailable(self) -> Self {
        self.map(SimBuilder::start_unavailable)
    }

    /// Initial script (appended to any previous `script` call).
    pub fn script(self, items: Vec<Scripted>) -> Self {
        self.map(|b| b.script(items))
    }

    /// Latency added before every default (unscripted) reply.
    pub fn latency(self, d: Duration) -> Self {
        self.map(|b| b.latency(d))
    }

    /// Every chat request waits for a permit (initially 0) before answering;
    /// [`Sim::release`] adds permits.
    pub fn gated(self) -> Self {
        self.map(SimBuilder::gated)
    }

    /// Function producing the default reply text from the request body.
    pub fn reply_with(self, f: impl Fn(&Value) -> String + Send + Sync + 'static) -> Self {
        self.map(|b| b.reply_with(f))
    }

    /// The same reply text, whatever the request.
    pub fn reply(self, text: &'static str) -> Self {
        self.reply_with(move |_| text.to_owned())
    }

    /// Listen on this port instead of an ephemeral one (to bring a backend
    /// "back" where the daemon expects it).
    pub fn port(self, port: u16) -> Self {
        self.map(|b| b.port(port))
    }

    pub async fn run(self) -> FakeVllm {
        FakeVllm {
            sim: self.sim.run().await,
        }
    }

    fn map(self, f: impl FnOnce(SimBuilder) -> SimBuilder) -> Self {
        FakeVllmBuilder { sim: f(self.sim) }
    }
}
