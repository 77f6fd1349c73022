//! Test MQTT clients over rumqttc: [`TestClient`] speaks MQTT 5,
//! [`TestClientV4`] MQTT 3.1.1.
//!
//! A spawned task polls the event loop and forwards incoming PUBLISH packets
//! into a channel. `subscribe` waits for the SUBACK and QoS 1 `publish` waits
//! for the PUBACK, so a test never races the broker. After a connection error
//! (e.g. a broker restart) the poll task keeps polling, which makes rumqttc
//! reconnect (with a 100 ms pause between attempts).

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio::task::JoinHandle;

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

const ACK_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_PACKET: usize = 4 * 1024 * 1024;
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// One received PUBLISH.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub correlation_data: Option<Bytes>,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
    pub retain: bool,
    /// MQTT 5 response topic (always `None` for v4).
    pub response_topic: Option<String>,
    /// QoS as 0, 1 or 2.
    pub qos: u8,
}

impl Received {
    /// Payload as UTF-8 (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// Payload parsed as JSON; panics with the payload text if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {:?}",
                self.topic,
                self.text()
            )
        })
    }

    /// Value of the first user property named `key`.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn qos_from(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => panic!("invalid QoS {q}"),
    }
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => panic!("invalid QoS {q}"),
    }
}

/// Connection settings for [`TestClient::connect_with`] /
/// [`TestClientV4::connect_with`].
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub client_id: String,
    /// MQTT 5 clean start / MQTT 3.1.1 clean session. Default true.
    pub clean_start: bool,
    /// MQTT 5 session expiry interval in seconds (ignored by v4). Default None.
    pub session_expiry: Option<u32>,
    /// `(username, password)`.
    pub credentials: Option<(String, String)>,
    /// Default 30 s.
    pub keep_alive: Duration,
}

impl ConnectOptions {
    pub fn new(client_id: &str) -> Self {
        ConnectOptions {
            client_id: client_id.to_string(),
            clean_start: true,
            session_expiry: None,
            credentials: None,
            keep_alive: Duration::from_secs(30),
        }
    }

    /// A persistent session: clean start false, session expiry 1 hour.
    pub fn persistent(client_id: &str) -> Self {
        ConnectOptions {
            clean_start: false,
            session_expiry: Some(3600),
            ..Self::new(client_id)
        }
    }

    pub fn credentials(mut self, user: &str, pass: &str) -> Self {
        self.credentials = Some((user.to_string(), pass.to_string()));
        self
    }
}

/// Counters published by the poll task.
#[derive(Debug, Default, Clone)]
struct Acks {
    subacks: u64,
    /// Failure reasons of the most recent SUBACK (empty when all granted).
    last_suback_failures: Vec<String>,
    pubacks: u64,
    connacks: u64,
    /// DISCONNECT was flushed; the poll task has ended.
    disconnected: bool,
}

/// An MQTT 5 test client.
pub struct TestClient {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Received>,
    acks: watch::Receiver<Acks>,
    op_lock: Mutex<()>,
    task: JoinHandle<()>,
    client_id: String,
}

impl Drop for TestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_ack<F>(acks: &mut watch::Receiver<Acks>, what: &str, f: F) -> Acks
where
    F: Fn(&Acks) -> bool,
{
    match tokio::time::timeout(ACK_TIMEOUT, acks.wait_for(|a| f(a))).await {
        Ok(Ok(a)) => a.clone(),
        Ok(Err(_)) => panic!("MQTT test client: event loop ended while waiting for {what}"),
        Err(_) => panic!("MQTT test client: no {what} within {ACK_TIMEOUT:?}"),
    }
}

/// Wait (bounded) until the poll task has flushed DISCONNECT or ended.
async fn wait_disconnect(acks: &watch::Receiver<Acks>, queued: bool) {
    if !queued {
        return;
    }
    let mut acks = acks.clone();
    // Err means the poll task ended, which is just as good.
    let _ = tokio::time::timeout(ACK_TIMEOUT, acks.wait_for(|a| a.disconnected)).await;
}

impl TestClient {
    /// MQTT 5, clean start; waits for the CONNACK (10 s), panics on failure.
    pub async fn connect(host: &str, port: u16, client_id: &str) -> TestClient {
        Self::connect_with(host, port, ConnectOptions::new(client_id))
            .await
            .unwrap_or_else(|e| panic!("MQTT v5 connect to {host}:{port} failed: {e}"))
    }

    /// MQTT 5 persistent session (clean start false, session expiry 1 h).
    pub async fn connect_persistent(host: &str, port: u16, client_id: &str) -> TestClient {
        Self::connect_with(host, port, ConnectOptions::persistent(client_id))
            .await
            .unwrap_or_else(|e| panic!("MQTT v5 connect to {host}:{port} failed: {e}"))
    }

    /// Connect with explicit options; `Err` describes a refused or failed
    /// first connection (e.g. bad credentials) or a CONNACK timeout.
    pub async fn connect_with(
        host: &str,
        port: u16,
        opts: ConnectOptions,
    ) -> Result<TestClient, String> {
        let mut mo = MqttOptions::new(opts.client_id.clone(), host, port);
        mo.set_keep_alive(opts.keep_alive);
        mo.set_clean_start(opts.clean_start);
        mo.set_max_packet_size(Some(MAX_PACKET as u32));
        if opts.session_expiry.is_some() {
            mo.set_session_expiry_interval(opts.session_expiry);
        }
        if let Some((u, p)) = &opts.credentials {
            mo.set_credentials(u.clone(), p.clone());
        }
        // Like paho, which sets TCP_NODELAY: no 40 ms Nagle stalls.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        mo.set_network_options(net);
        let (client, mut eventloop) = AsyncClient::new(mo, 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let (acks_tx, acks_rx) = watch::channel(Acks::default());
        let (first_tx, first_rx) = oneshot::channel::<Result<(), String>>();

        let task = tokio::spawn(async move {
            let mut first = Some(first_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        acks_tx.send_modify(|a| a.connacks += 1);
                        if let Some(f) = first.take() {
                            let _ = f.send(Ok(()));
                        }
                        let _ = ack;
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.unwrap_or_default();
                        let _ = tx.send(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload,
                            correlation_data: props.correlation_data,
                            content_type: props.content_type,
                            user_properties: props.user_properties,
                            retain: p.retain,
                            response_topic: props.response_topic,
                            qos: p.qos as u8,
                        });
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        let failures: Vec<String> = s
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                            .map(|c| format!("{c:?}"))
                            .collect();
                        acks_tx.send_modify(|a| {
                            a.subacks += 1;
                            a.last_suback_failures = failures;
                        });
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acks_tx.send_modify(|a| a.pubacks += 1);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        acks_tx.send_modify(|a| a.disconnected = true);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(f) = first.take() {
                            let _ = f.send(Err(e.to_string()));
                            return;
                        }
                        if matches!(e, rumqttc::v5::ConnectionError::RequestsDone) {
                            return;
                        }
                        // Let rumqttc reconnect on the next poll.
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                    }
                }
            }
        });

        match tokio::time::timeout(ACK_TIMEOUT, first_rx).await {
            Ok(Ok(Ok(()))) => Ok(TestClient {
                client,
                rx,
                acks: acks_rx,
                op_lock: Mutex::new(()),
                task,
                client_id: opts.client_id,
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => {
                task.abort();
                Err("event loop task ended before CONNACK".to_string())
            }
            Err(_) => {
                task.abort();
                Err(format!("no CONNACK within {ACK_TIMEOUT:?}"))
            }
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The underlying rumqttc client, for anything not wrapped here.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Number of CONNACKs seen so far (1 after connect; more after
    /// reconnects).
    pub fn connacks(&self) -> u64 {
        self.acks.borrow().connacks
    }

    /// Wait until at least `n` CONNACKs have been seen (e.g. reconnected
    /// after a broker restart). Panics after 10 s.
    pub async fn wait_connacks(&self, n: u64) {
        let mut acks = self.acks.clone();
        wait_ack(&mut acks, "reconnect CONNACK", |a| a.connacks >= n).await;
    }

    /// Subscribe with QoS 1 and wait for the SUBACK; panics if refused.
    pub async fn subscribe(&self, filter: &str) {
        self.subscribe_qos(filter, 1).await
    }

    /// Subscribe with the given QoS and wait for the SUBACK.
    pub async fn subscribe_qos(&self, filter: &str, qos: u8) {
        let _g = self.op_lock.lock().await;
        let mut acks = self.acks.clone();
        let before = acks.borrow().subacks;
        self.client
            .subscribe(filter, qos_from(qos))
            .await
            .expect("queue SUBSCRIBE");
        let a = wait_ack(&mut acks, "SUBACK", |a| a.subacks > before).await;
        assert!(
            a.last_suback_failures.is_empty(),
            "subscription to {filter} refused: {:?}",
            a.last_suback_failures
        );
    }

    /// Unsubscribe (does not wait for the UNSUBACK).
    pub async fn unsubscribe(&self, filter: &str) {
        self.client
            .unsubscribe(filter)
            .await
            .expect("queue UNSUBSCRIBE");
    }

    /// Publish with QoS 0 or 1; QoS 1 waits for the PUBACK.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: u8) {
        self.publish_with(topic, payload, qos, PublishProperties::default())
            .await
    }

    /// Publish with MQTT 5 properties (response topic, correlation data,
    /// user properties, ...); QoS 1 waits for the PUBACK.
    pub async fn publish_with(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        props: PublishProperties,
    ) {
        self.publish_full(topic, payload, qos, false, props).await
    }

    /// Publish a retained message; QoS 1 waits for the PUBACK.
    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: u8) {
        self.publish_full(topic, payload, qos, true, PublishProperties::default())
            .await
    }

    async fn publish_full(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: u8,
        retain: bool,
        props: PublishProperties,
    ) {
        let _g = self.op_lock.lock().await;
        let mut acks = self.acks.clone();
        let before = acks.borrow().pubacks;
        let payload: Vec<u8> = payload.into();
        self.client
            .publish_with_properties(topic, qos_from(qos), retain, payload, props)
            .await
            .expect("queue PUBLISH");
        if qos >= 1 {
            wait_ack(&mut acks, "PUBACK", |a| a.pubacks > before).await;
        }
    }

    /// Next message, or `None` after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Next message; panics on timeout.
    pub async fn expect(&mut self, timeout: Duration) -> Received {
        match self.recv(timeout).await {
            Some(m) => m,
            None => panic!(
                "MQTT client {}: no message within {timeout:?}",
                self.client_id
            ),
        }
    }

    /// Next message on exactly `topic`, skipping others; panics on timeout.
    pub async fn expect_on(&mut self, topic: &str, timeout: Duration) -> Received {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(m)) if m.topic == topic => return m,
                Ok(Some(_)) => continue,
                _ => panic!(
                    "MQTT client {}: no message on {topic} within {timeout:?}",
                    self.client_id
                ),
            }
        }
    }

    /// Panics if a message arrives within `wait`.
    pub async fn expect_none(&mut self, wait: Duration) {
        if let Some(m) = self.recv(wait).await {
            panic!(
                "MQTT client {}: expected no message, got {} {:?}",
                self.client_id,
                m.topic,
                m.text()
            );
        }
    }

    /// Send DISCONNECT and wait until it is flushed (the session stays on the
    /// broker if it is persistent). The client is unusable afterwards.
    pub async fn disconnect(&self) {
        wait_disconnect(&self.acks, self.client.disconnect().await.is_ok()).await
    }
}

/// An MQTT 3.1.1 test client with the same API as [`TestClient`] (minus
/// properties).
pub struct TestClientV4 {
    client: rumqttc::AsyncClient,
    rx: mpsc::UnboundedReceiver<Received>,
    acks: watch::Receiver<Acks>,
    op_lock: Mutex<()>,
    task: JoinHandle<()>,
    client_id: String,
}

impl Drop for TestClientV4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestClientV4 {
    /// MQTT 3.1.1, clean session; waits for the CONNACK (10 s).
    pub async fn connect(host: &str, port: u16, client_id: &str) -> TestClientV4 {
        Self::connect_with(host, port, ConnectOptions::new(client_id))
            .await
            .unwrap_or_else(|e| panic!("MQTT v4 connect to {host}:{port} failed: {e}"))
    }

    /// MQTT 3.1.1 with clean session false.
    pub async fn connect_persistent(host: &str, port: u16, client_id: &str) -> TestClientV4 {
        Self::connect_with(host, port, ConnectOptions::persistent(client_id))
            .await
            .unwrap_or_else(|e| panic!("MQTT v4 connect to {host}:{port} failed: {e}"))
    }

    pub async fn connect_with(
        host: &str,
        port: u16,
        opts: ConnectOptions,
    ) -> Result<TestClientV4, String> {
        use rumqttc::{Event as E4, Packet as P4};
        let mut mo = rumqttc::MqttOptions::new(opts.client_id.clone(), host, port);
        mo.set_keep_alive(opts.keep_alive);
        mo.set_clean_session(opts.clean_start);
        mo.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some((u, p)) = &opts.credentials {
            mo.set_credentials(u.clone(), p.clone());
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(mo, 1024);
        // Like paho, which sets TCP_NODELAY: no 40 ms Nagle stalls.
        eventloop.network_options.set_tcp_nodelay(true);
        let (tx, rx) = mpsc::unbounded_channel();
        let (acks_tx, acks_rx) = watch::channel(Acks::default());
        let (first_tx, first_rx) = oneshot::channel::<Result<(), String>>();

        let task = tokio::spawn(async move {
            let mut first = Some(first_tx);
            loop {
                match eventloop.poll().await {
                    Ok(E4::Incoming(P4::ConnAck(_))) => {
                        acks_tx.send_modify(|a| a.connacks += 1);
                        if let Some(f) = first.take() {
                            let _ = f.send(Ok(()));
                        }
                    }
                    Ok(E4::Incoming(P4::Publish(p))) => {
                        let _ = tx.send(Received {
                            topic: p.topic.clone(),
                            payload: p.payload,
                            correlation_data: None,
                            content_type: None,
                            user_properties: Vec::new(),
                            retain: p.retain,
                            response_topic: None,
                            qos: p.qos as u8,
                        });
                    }
                    Ok(E4::Incoming(P4::SubAck(s))) => {
                        let failures: Vec<String> = s
                            .return_codes
                            .iter()
                            .filter(|c| !matches!(c, rumqttc::SubscribeReasonCode::Success(_)))
                            .map(|c| format!("{c:?}"))
                            .collect();
                        acks_tx.send_modify(|a| {
                            a.subacks += 1;
                            a.last_suback_failures = failures;
                        });
                    }
                    Ok(E4::Incoming(P4::PubAck(_))) => {
                        acks_tx.send_modify(|a| a.pubacks += 1);
                    }
                    Ok(E4::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        acks_tx.send_modify(|a| a.disconnected = true);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Some(f) = first.take() {
                            let _ = f.send(Err(e.to_string()));
                            return;
                        }
                        if matches!(e, rumqttc::ConnectionError::RequestsDone) {
                            return;
                        }
                        tokio::time::sleep(RECONNECT_PAUSE).await;
                    }
                }
            }
        });

        match tokio::time::timeout(ACK_TIMEOUT, first_rx).await {
            Ok(Ok(Ok(()))) => Ok(TestClientV4 {
                client,
                rx,
                acks: acks_rx,
                op_lock: Mutex::new(()),
                task,
                client_id: opts.client_id,
            }),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => {
                task.abort();
                Err("event loop task ended before CONNACK".to_string())
            }
            Err(_) => {
                task.abort();
                Err(format!("no CONNACK within {ACK_TIMEOUT:?}"))
            }
        }
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn client(&self) -> &rumqttc::AsyncClient {
        &self.client
    }

    pub fn connacks(&self) -> u64 {
        self.acks.borrow().connacks
    }

    pub async fn wait_connacks(&self, n: u64) {
        let mut acks = self.acks.clone();
        wait_ack(&mut acks, "reconnect CONNACK", |a| a.connacks >= n).await;
    }

    /// Subscribe with QoS 1 and wait for the SUBACK; panics if refused.
    pub async fn subscribe(&self, filter: &str) {
        self.subscribe_qos(filter, 1).await
    }

    pub async fn subscribe_qos(&self, filter: &str, qos: u8) {
        let _g = self.op_lock.lock().await;
        let mut acks = self.acks.clone();
        let before = acks.borrow().subacks;
        self.client
            .subscribe(filter, qos_v4(qos))
            .await
            .expect("queue SUBSCRIBE");
        let a = wait_ack(&mut acks, "SUBACK", |a| a.subacks > before).await;
        assert!(
            a.last_suback_failures.is_empty(),
            "subscription to {filter} refused: {:?}",
            a.last_suback_failures
        );
    }

    /// Publish with QoS 0 or 1; QoS 1 waits for the PUBACK.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: u8) {
        self.publish_full(topic, payload, qos, false).await
    }

    pub async fn publish_retained(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: u8) {
        self.publish_full(topic, payload, qos, true).await
    }

    async fn publish_full(&self, topic: &str, payload: impl Into<Vec<u8>>, qos: u8, retain: bool) {
        let _g = self.op_lock.lock().await;
        let mut acks = self.acks.clone();
        let before = acks.borrow().pubacks;
        let payload: Vec<u8> = payload.into();
        self.client
            .publish(topic, qos_v4(qos), retain, payload)
            .await
            .expect("queue PUBLISH");
        if qos >= 1 {
            wait_ack(&mut acks, "PUBACK", |a| a.pubacks > before).await;
        }
    }

    pub async fn recv(&mut self, timeout: Duration) -> Option<Received> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    pub async fn expect(&mut self, timeout: Duration) -> Received {
        match self.recv(timeout).await {
            Some(m) => m,
            None => panic!(
                "MQTT client {}: no message within {timeout:?}",
                self.client_id
            ),
        }
    }

    pub async fn expect_none(&mut self, wait: Duration) {
        if let Some(m) = self.recv(wait).await {
            panic!(
                "MQTT client {}: expected no message, got {} {:?}",
                self.client_id,
                m.topic,
                m.text()
            );
        }
    }

    /// Send DISCONNECT and wait until it is flushed.
    pub async fn disconnect(&self) {
        wait_disconnect(&self.acks, self.client.disconnect().await.is_ok()).await
    }
}
