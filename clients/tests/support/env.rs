//! A broker, the fake vLLM and the daemon in-process: what the client and
//! tool tests run against. Each test file adds its own helpers in an
//! `impl Env` of its own.

use vllm_mqttd::Config;

use super::broker::Mosquitto;
use super::daemon::{config, Daemon};
use super::fake_vllm::FakeVllm;

pub struct Env {
    pub broker: Mosquitto,
    pub fake: FakeVllm,
    pub daemon: Daemon,
}

impl Env {
    /// Starts a private Mosquitto and the daemon on it (after `tweak`).
    pub async fn start(fake: FakeVllm, tweak: impl FnOnce(&mut Config)) -> Env {
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

    /// Stops the daemon cleanly, then the fake and the broker.
    pub async fn stop(self) {
        self.daemon.stop().await.expect("daemon stops cleanly");
        drop(self.fake);
        drop(self.broker);
    }
}
