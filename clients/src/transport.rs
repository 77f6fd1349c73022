//! One MQTT connection of either protocol version, and its poll loop.
//!
//! rumqttc has two clients (`rumqttc::v5` and the 3.1.1 one at the crate
//! root) with the same shape and different types. Two small enums hide
//! which one a connection uses: [`Link`], the sending half, and `Events`,
//! the event loop, whose `poll` turns either version's events into one
//! version-neutral `Polled`. The poll loop (`run`) is written once, over
//! `Events`, and so are [`Client`](crate::Client) and the stress tool.
//! What really differs per version (building the options, reading
//! packets, which refusals are final) lives in the `v5` and `v4`
//! submodules.
//!
//! The poll loop hands every event to a *synchronous* handler. Every
//! outgoing packet travels through the event loop it polls, so a handler
//! that awaited a publish would deadlock as soon as rumqttc's request
//! channel filled; making the handler a plain `FnMut` rules that out at
//! compile time. It sleeps only while the broker is unreachable (between
//! reconnect attempts), when nothing can flow anyway.
//!
//! It sits below the client: it knows options and errors, not requests.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use vllm_plumbing::backoff::Reconnect;

use crate::error::ClientError;
use crate::options::{ClientOptions, Protocol};

/// Capacity of rumqttc's request channel. Callers (never the poll loop)
/// wait for room when it is full.
const REQUEST_CAPACITY: usize = 1024;
/// Largest packet we accept: replies carry model output, and rumqttc's
/// 3.1.1 default (10 KiB) would drop the connection on a long answer.
const MAX_PACKET: usize = 1024 * 1024;
/// First and longest pause between reconnect attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the reconnect delay; one the
/// broker drops at once (a publish it refuses, say) keeps doubling it, so
/// a fault on connect cannot become a reconnect storm.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The sending half of a connection (cheap to clone).
#[derive(Clone)]
pub(crate) enum Link {
    V5(rumqttc::v5::AsyncClient),
    V4(rumqttc::AsyncClient),
}

/// MQTT 5 properties of a request; ignored on 3.1.1.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestProps {
    pub response_topic: Option<String>,
    pub correlation: Option<Bytes>,
    pub expiry: Option<Duration>,
}

/// A message received on one of our subscriptions.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 Correlation Data (`None` on 3.1.1).
    pub correlation: Option<Bytes>,
}

/// What the poll loop saw, in version-neutral terms.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// CONNACK: the (re)connection is up. We always start clean, so the
    /// broker has forgotten our subscriptions.
    Connected,
    /// A SUBSCRIBE we queued was handed to the network with this packet id
    /// (in the order we queued them).
    Subscribing(u16),
    /// SUBACK for packet `pkid`: one result per filter of that SUBSCRIBE.
    SubAck {
        pkid: u16,
        results: Vec<Result<(), String>>,
    },
    /// A PUBLISH on one of our subscriptions.
    Message(Message),
    /// The connection failed; the loop reconnects after a pause.
    Lost(String),
}

impl Link {
    /// Queues a SUBSCRIBE at QoS 1 without waiting (the poll loop may call
    /// it). Fails only when the request channel is full or closed.
    pub fn try_subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Link::V5(c) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Link::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a PUBLISH, waiting for room in the request channel. Never
    /// call this from the poll loop's handler.
    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        payload: Vec<u8>,
        props: RequestProps,
    ) -> Result<(), String> {
        match self {
            Link::V5(c) => {
                let (qos, properties) = v5::publish_args(qos, props);
                c.publish_with_properties(topic, qos, false, payload, properties)
                    .await
                    .map_err(|e| e.to_string())
            }
            Link::V4(c) => c
                .publish(topic, v4::qos(qos), false, payload)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT; the poll loop ends once it is sent.
    pub async fn disconnect(&self) {
        let _ = match self {
            Link::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Link::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// The receiving half: rumqttc's event loop of either version (boxed: they
/// are large, of different sizes, and there is one per connection).
enum Events {
    V5(Box<rumqttc::v5::EventLoop>),
    V4(Box<rumqttc::EventLoop>),
}

/// One poll of the event loop, version-neutral.
enum Polled {
    /// An event for the handler ([`NetEvent::Connected`] included).
    Event(NetEvent),
    /// Nothing the handler cares about (PINGRESP, PUBACK, ...).
    Nothing,
    /// Our DISCONNECT went out, or every handle is gone: the loop ends.
    Done,
    /// The connection failed. `refusal` is set when retrying cannot fix
    /// it (credentials, client id, TLS).
    Failed {
        error: String,
        refusal: Option<String>,
        /// The broker dropped or refused an MQTT 5 CONNECT as such (a
        /// 3.1.1-only listener): worth one try with 3.1.1.
        v5_unsupported: bool,
    },
}

impl Events {
    async fn poll(&mut self) -> Polled {
        match self {
            Events::V5(events) => v5::polled(events.poll().await),
            Events::V4(events) => v4::polled(events.poll().await),
        }
    }
}

/// The transport rumqttc should use: TLS with our CA, or plain TCP.
fn transport(opts: &ClientOptions) -> Result<Option<Transport>, ClientError> {
    if !opts.tls {
        return Ok(None);
    }
    // rumqttc is built without a crypto provider; make ring the process
    // default (a no-op if the application installed one already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca =
        crate::tls::load_ca_pem(opts.ca_file.as_deref()).map_err(ClientError::InvalidOptions)?;
    Ok(Some(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth: None,
    })))
}

/// Connects, waits for the first CONNACK (or failure), and spawns the poll
/// loop that feeds every event to the handler `make_handler` builds (it
/// gets the link first, to subscribe from the handler), until the link
/// disconnects or the returned task is aborted.
///
/// With [`Protocol::V5`] (the default), a broker that drops or refuses the
/// MQTT 5 CONNECT itself (a 3.1.1-only listener, such as the embedded
/// broker's device port) is tried once more with MQTT 3.1.1, said at info
/// level (`-v` in the tools): the returned link is then a 3.1.1 one, and
/// requests carry their reply topic in the payload only.
pub(crate) async fn connect<F, H>(
    opts: &ClientOptions,
    client_id: &str,
    make_handler: F,
) -> Result<(Link, JoinHandle<()>), ClientError>
where
    F: FnOnce(Link) -> H + Send + 'static,
    H: FnMut(NetEvent) + Send + 'static,
{
    match attempt(opts, opts.protocol, client_id, make_handler).await {
        Ok(connected) => Ok(connected),
        Err(Failure {
            error,
            v5_unsupported: true,
            make_handler: Some(make_handler),
        }) if opts.protocol == Protocol::V5 => {
            tracing::info!(
                host = %opts.host,
                port = opts.port,
                %error,
                "the broker dropped or refused the MQTT 5 CONNECT; connecting with MQTT 3.1.1"
            );
            attempt(opts, Protocol::V311, client_id, make_handler)
                .await
                .map_err(|f| f.error)
        }
        Err(f) => Err(f.error),
    }
}

/// Why a first connection failed, with the handler maker back when it was
/// never used (so another attempt can use it).
struct Failure<F> {
    error: ClientError,
    v5_unsupported: bool,
    make_handler: Option<F>,
}

/// One connection attempt with `protocol`.
async fn attempt<F, H>(
    opts: &ClientOptions,
    protocol: Protocol,
    client_id: &str,
    make_handler: F,
) -> Result<(Link, JoinHandle<()>), Failure<F>>
where
    F: FnOnce(Link) -> H + Send + 'static,
    H: FnMut(NetEvent) + Send + 'static,
{
    let fail = |error| Failure {
        error,
        v5_unsupported: false,
        make_handler: None,
    };
    let transport = transport(opts).map_err(fail)?;
    let (link, events) = match protocol {
        Protocol::V5 => {
            let (client, events) = rumqttc::v5::AsyncClient::new(
                v5::options(opts, client_id, transport),
                REQUEST_CAPACITY,
            );
            (Link::V5(client), Events::V5(Box::new(events)))
        }
        Protocol::V311 => {
            let (client, events) = v4::client(opts, client_id, transport);
            (Link::V4(client), Events::V4(Box::new(events)))
        }
    };
    let (first_tx, first_rx) = oneshot::channel();
    let task = tokio::spawn(run(events, first_tx, make_handler, link.clone()));
    // rumqttc's own connection timeout bounds the TCP/TLS/CONNECT exchange;
    // this outer bound only guards against a task that never reports.
    let bound = opts.connect_timeout + Duration::from_secs(5);
    match tokio::time::timeout(bound, first_rx).await {
        Ok(Ok(Ok(()))) => Ok((link, task)),
        Ok(Ok(Err(failure))) => Err(failure),
        Ok(Err(_)) => Err(fail(ClientError::Connection(
            "the MQTT poll loop ended before CONNACK".to_owned(),
        ))),
        Err(_) => {
            task.abort();
            Err(fail(ClientError::Connection(format!(
                "no CONNACK from {}:{} within {bound:?}",
                opts.host, opts.port
            ))))
        }
    }
}

/// The poll loop, for both versions. The first connection's outcome goes
/// to `first`: a failure there ends the loop (the caller gets the error,
/// and the unused handler maker back); on success the handler is built and
/// gets every event from the CONNACK on. After it, a failure is
/// [`NetEvent::Lost`] and a reconnect after a pause that doubles up to
/// [`RECONNECT_MAX`] (the daemon's policy: `vllm_plumbing::backoff`).
async fn run<F, H>(
    mut events: Events,
    first: oneshot::Sender<Result<(), Failure<F>>>,
    make_handler: F,
    link: Link,
) where
    F: FnOnce(Link) -> H,
    H: FnMut(NetEvent),
{
    let mut handler = loop {
        match events.poll().await {
            Polled::Event(NetEvent::Connected) => {
                let mut handler = make_handler(link);
                let _ = first.send(Ok(()));
                handler(NetEvent::Connected);
                break handler;
            }
            // Nothing else comes before the CONNACK.
            Polled::Event(_) | Polled::Nothing => {}
            Polled::Done => return,
            Polled::Failed {
                error,
                refusal,
                v5_unsupported,
            } => {
                let _ = first.send(Err(Failure {
                    error: match refusal {
                        Some(r) if !v5_unsupported => ClientError::Refused(r),
                        _ => ClientError::Connection(error),
                    },
                    v5_unsupported,
                    make_handler: Some(make_handler),
                }));
                return;
            }
        }
    };
    let mut backoff = Reconnect::new(RECONNECT_MIN, RECONNECT_MAX, STABLE_CONNECTION);
    backoff.connected(Instant::now());
    loop {
        match events.poll().await {
            Polled::Event(event) => {
                if let NetEvent::Connected = event {
                    backoff.connected(Instant::now());
                }
                handler(event);
            }
            Polled::Nothing => {}
            Polled::Done => return,
            Polled::Failed { error, .. } => {
                handler(NetEvent::Lost(error));
                tokio::time::sleep(backoff.failed(Instant::now())).await;
            }
        }
    }
}

/// MQTT 5: `rumqttc::v5`.
mod v5 {
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeReasonCode as R};
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{ConnectionError as E, Event, MqttOptions};
    use rumqttc::{Outgoing, Transport};

    use super::{Message, NetEvent, Polled, RequestProps, MAX_PACKET};
    use crate::options::ClientOptions;

    pub(super) fn options(
        opts: &ClientOptions,
        client_id: &str,
        transport: Option<Transport>,
    ) -> MqttOptions {
        let mut mo = MqttOptions::new(client_id, opts.host.clone(), opts.port);
        mo.set_keep_alive(opts.keep_alive)
            .set_clean_start(true)
            .set_max_packet_size(Some(MAX_PACKET as u32))
            .set_connection_timeout(opts.connect_timeout.as_secs().max(1));
        if let Some(user) = &opts.username {
            mo.set_credentials(user.clone(), opts.password.clone().unwrap_or_default());
        }
        if let Some(t) = transport {
            mo.set_transport(t);
        }
        // Requests are small and latency-bound: with Nagle's algorithm on,
        // one written while an earlier packet is unacknowledged waits for
        // the broker's delayed ACK (40 ms on Linux).
        let mut net = mo.network_options();
        net.set_tcp_nodelay(true);
        mo.set_network_options(net);
        mo
    }

    pub(super) fn publish_args(qos: u8, props: RequestProps) -> (QoS, PublishProperties) {
        let qos = match qos {
            0 => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        };
        let properties = PublishProperties {
            response_topic: props.response_topic,
            correlation_data: props.correlation,
            message_expiry_interval: props
                .expiry
                .map(|d| d.as_secs_f64().ceil().clamp(1.0, u32::MAX as f64) as u32),
            content_type: Some(crate::protocol::JSON_CONTENT_TYPE.to_owned()),
            ..Default::default()
        };
        (qos, properties)
    }

    pub(super) fn polled(polled: Result<Event, E>) -> Polled {
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Polled::Event(NetEvent::Connected),
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                Polled::Event(NetEvent::Subscribing(pkid))
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => Polled::Event(NetEvent::SubAck {
                pkid: ack.pkid,
                results: ack
                    .return_codes
                    .iter()
                    .map(|c| match c {
                        R::Success(_) => Ok(()),
                        other => Err(format!("{other:?}")),
                    })
                    .collect(),
            }),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let props = p.properties.unwrap_or_default();
                Polled::Event(NetEvent::Message(Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    correlation: props.correlation_data,
                }))
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(E::RequestsDone) => Polled::Done,
            Ok(_) => Polled::Nothing,
            Err(e) => Polled::Failed {
                v5_unsupported: v5_unsupported(&e),
                refusal: crate::tls::refusal_v5(&e),
                error: e.to_string(),
            },
        }
    }

    /// Did the broker take the connection but not MQTT 5? A broker set to
    /// 3.1.1 only refuses the version (MQTT 5 reason 0x84), an older one
    /// answers in 3.1.1's CONNACK format, which does not parse as MQTT 5
    /// (return code 1, no properties), and rumqttd's v4 listener closes
    /// the socket on the CONNECT. Only asked about the first connection,
    /// whose 3.1.1 retry reports its own failure if the broker is broken.
    fn v5_unsupported(e: &E) -> bool {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
        use rumqttc::v5::StateError;
        match e {
            E::ConnectionRefused(C::UnsupportedProtocolVersion) => true,
            E::MqttState(StateError::ConnectionAborted | StateError::Deserialization(_)) => true,
            E::MqttState(StateError::Io(io)) | E::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            _ => false,
        }
    }
}

/// MQTT 3.1.1: rumqttc's crate root.
mod v4 {
    use rumqttc::{
        AsyncClient, ConnectionError as E, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
        SubscribeReasonCode as R, Transport,
    };

    use super::{Message, NetEvent, Polled, MAX_PACKET, REQUEST_CAPACITY};
    use crate::options::ClientOptions;

    /// The 3.1.1 client; its network options live on the event loop.
    pub(super) fn client(
        opts: &ClientOptions,
        client_id: &str,
        transport: Option<Transport>,
    ) -> (AsyncClient, EventLoop) {
        let mut mo = MqttOptions::new(client_id, opts.host.clone(), opts.port);
        mo.set_keep_alive(opts.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some(user) = &opts.username {
            mo.set_credentials(user.clone(), opts.password.clone().unwrap_or_default());
        }
        if let Some(t) = transport {
            mo.set_transport(t);
        }
        let (client, mut events) = AsyncClient::new(mo, REQUEST_CAPACITY);
        events
            .network_options
            .set_connection_timeout(opts.connect_timeout.as_secs().max(1));
        // No Nagle delay (see the MQTT 5 options).
        events.network_options.set_tcp_nodelay(true);
        (client, events)
    }

    pub(super) fn qos(qos: u8) -> QoS {
        match qos {
            0 => QoS::AtMostOnce,
            _ => QoS::AtLeastOnce,
        }
    }

    pub(super) fn polled(polled: Result<Event, E>) -> Polled {
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Polled::Event(NetEvent::Connected),
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                Polled::Event(NetEvent::Subscribing(pkid))
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => Polled::Event(NetEvent::SubAck {
                pkid: ack.pkid,
                results: ack
                    .return_codes
                    .iter()
                    .map(|c| match c {
                        R::Success(_) => Ok(()),
                        R::Failure => Err("Failure".to_owned()),
                    })
                    .collect(),
            }),
            Ok(Event::Incoming(Packet::Publish(p))) => Polled::Event(NetEvent::Message(Message {
                topic: p.topic,
                payload: p.payload,
                correlation: None,
            })),
            Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(E::RequestsDone) => Polled::Done,
            Ok(_) => Polled::Nothing,
            Err(e) => Polled::Failed {
                refusal: crate::tls::refusal_v4(&e),
                error: e.to_string(),
                v5_unsupported: false,
            },
        }
    }
}
