//! One environment builder for every integration test of the workspace: a
//! private Mosquitto, a backend the test controls, and the daemon
//! in-process on them. The daemon's tests add a device
//! ([`Env::device`]); the client's tests add their clients. Each test file
//! adds helpers of its own through a local trait or a wrapper.

use vllm_mqttd::Config;

use crate::broker::Mosquitto;
use crate::daemon::{config, device, Daemon};
use crate::fake_vllm::FakeVllm;
use crate::mqtt_client::TestClient;
use crate::raw_http::RawBackend;

/// A backend the daemon can be pointed at.
pub trait Backend {
    /// The OpenAI base URL (`http://host:port/v1`).
    fn base_url(&self) -> String;
}

impl Backend for FakeVllm {
    fn base_url(&self) -> String {
        (**self).base_url()
    }
}

impl Backend for RawBackend {
    fn base_url(&self) -> String {
        RawBackend::base_url(self)
    }
}

impl Backend for vllm_sim::Sim {
    fn base_url(&self) -> String {
        vllm_sim::Sim::base_url(self)
    }
}

/// A backend that is only an address (nothing listening yet, say).
impl Backend for String {
    fn base_url(&self) -> String {
        self.clone()
    }
}

/// The broker, the backend and the daemon.
pub struct Env<B = FakeVllm> {
    pub broker: Mosquitto,
    /// The backend the test controls.
    pub fake: B,
    pub daemon: Daemon,
}

impl Env<vllm_sim::Sim> {
    /// The simulator at a real vLLM's pace (an answer as long as the
    /// request's `max_tokens`, streamed token by token for seconds), the
    /// daemon taking the model it serves: for stopping a generation
    /// mid-way.
    pub async fn paced() -> Self {
        let sim = vllm_sim::Sim::builder()
            .output_tokens(vllm_sim::OutputLen::Request)
            .run()
            .await;
        Env::start(sim, |c| c.backend.model = String::new()).await
    }
}

impl<B: Backend> Env<B> {
    /// Starts a private Mosquitto and the daemon on it and `fake` (after
    /// `tweak` of the tests' default configuration).
    pub async fn start(fake: B, tweak: impl FnOnce(&mut Config)) -> Env<B> {
        let broker = Mosquitto::start().await;
        let mut c = config(broker.host(), broker.port(), &fake.base_url());
        tweak(&mut c);
        let daemon = Daemon::start(c).await;
        Env {
            broker,
            fake,
            daemon,
        }
    }

    /// A device subscribed to every reply of `project`.
    pub async fn device(&self, project: &str) -> TestClient {
        device(self.broker.host(), self.broker.port(), project).await
    }

    /// Stops the daemon (it must stop cleanly), then the backend and the
    /// broker.
    pub async fn stop(self) {
        self.daemon.stop().await.expect("daemon stops cleanly");
        drop(self.fake);
        drop(self.broker);
    }
}
