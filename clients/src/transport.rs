//! One MQTT connection of either protocol version, and its poll loop.
//!
//! rumqttc has two clients (`rumqttc::v5` and the 3.1.1 one at the crate
//! root) with the same shape and different types. [`Link`] hides which one
//! a connection uses, and the poll loop turns either's events into
//! [`NetEvent`], so [`Client`](crate::Client) and the stress tool are
//! written once.
//!
//! The poll loop hands every event to a *synchronous* handler. Every
//! outgoing packet travels through the event loop it polls, so a handler
//! that awaited a publish would deadlock as soon as rumqttc's request
//! channel filled; making the handler a plain `FnMut` rules that out at
//! compile time. It sleeps only while the broker is unreachable (between
//! reconnect attempts), when nothing can flow anyway.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{ClientError, ClientOptions, Protocol};

/// Capacity of rumqttc's request channel. Callers (never the poll loop)
/// wait for room when it is full.
const REQUEST_CAPACITY: usize = 1024;
/// Largest packet we accept: replies carry model output, and rumqttc's
/// 3.1.1 default (10 KiB) would drop the connection on a long answer.
const MAX_PACKET: usize = 1024 * 1024;
/// First and longest pause between reconnect attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

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

fn qos1_v5() -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        _ => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
    }
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        _ => rumqttc::QoS::AtLeastOnce,
    }
}

impl Link {
    /// Queues a SUBSCRIBE at QoS 1 without waiting (the poll loop may call
    /// it). Fails only when the request channel is full or closed.
    pub fn try_subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Link::V5(c) => c
                .try_subscribe(filter, qos1_v5())
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
                let properties = PublishProperties {
                    response_topic: props.response_topic,
                    correlation_data: props.correlation,
                    message_expiry_interval: props
                        .expiry
                        .map(|d| d.as_secs_f64().ceil().clamp(1.0, u32::MAX as f64) as u32),
                    content_type: Some(crate::protocol::JSON_CONTENT_TYPE.to_owned()),
                    ..Default::default()
                };
                c.publish_with_properties(topic, qos_v5(qos), false, payload, properties)
                    .await
                    .map_err(|e| e.to_string())
            }
            Link::V4(c) => c
                .publish(topic, qos_v4(qos), false, payload)
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

/// A refusal that retrying will not fix: wrong credentials, a client id
/// the broker rejects, or a certificate it cannot verify.
fn refusal_v5(e: &rumqttc::v5::ConnectionError) -> Option<String> {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(
            code @ (C::BadUserNamePassword
            | C::NotAuthorized
            | C::Banned
            | C::BadAuthenticationMethod
            | C::ClientIdentifierNotValid
            | C::UnsupportedProtocolVersion),
        ) => Some(format!("{code:?}")),
        E::Tls(t) if crate::tls::is_fatal(t) => Some(format!("TLS: {t}")),
        _ => None,
    }
}

fn refusal_v4(e: &rumqttc::ConnectionError) -> Option<String> {
    use rumqttc::ConnectReturnCode as C;
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(
            code @ (C::BadUserNamePassword
            | C::NotAuthorized
            | C::BadClientId
            | C::RefusedProtocolVersion),
        ) => Some(format!("{code:?}")),
        E::Tls(t) if crate::tls::is_fatal(t) => Some(format!("TLS: {t}")),
        _ => None,
    }
}

/// Why the first connection attempt failed.
fn first_error(refusal: Option<String>, error: String) -> ClientError {
    match refusal {
        Some(r) => ClientError::Refused(r),
        None => ClientError::Connection(error),
    }
}

/// Connects, waits for the first CONNACK (or failure), and spawns the poll
/// loop that feeds every event to the handler `make_handler` builds (it
/// gets the link first, to subscribe from the handler), until the link
/// disconnects or the returned task is aborted.
pub(crate) async fn connect<F, H>(
    opts: &ClientOptions,
    client_id: &str,
    make_handler: F,
) -> Result<(Link, JoinHandle<()>), ClientError>
where
    F: FnOnce(Link) -> H,
    H: FnMut(NetEvent) + Send + 'static,
{
    let transport = transport(opts)?;
    let (first_tx, first_rx) = oneshot::channel::<Result<(), ClientError>>();
    let (link, task) = match opts.protocol {
        Protocol::V5 => {
            use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode as R};
            use rumqttc::v5::{Event, MqttOptions};
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
            // Requests are small and latency-bound: with Nagle's algorithm
            // on, one written while an earlier packet is unacknowledged
            // waits for the broker's delayed ACK (40 ms on Linux).
            let mut net = mo.network_options();
            net.set_tcp_nodelay(true);
            mo.set_network_options(net);
            let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(mo, REQUEST_CAPACITY);
            let mut handler = make_handler(Link::V5(client.clone()));
            let task = tokio::spawn(async move {
                let mut first = Some(first_tx);
                let mut backoff = RECONNECT_MIN;
                loop {
                    let event = match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            backoff = RECONNECT_MIN;
                            if let Some(f) = first.take() {
                                let _ = f.send(Ok(()));
                            }
                            NetEvent::Connected
                        }
                        Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                            NetEvent::Subscribing(pkid)
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => NetEvent::SubAck {
                            pkid: ack.pkid,
                            results: ack
                                .return_codes
                                .iter()
                                .map(|c| match c {
                                    R::Success(_) => Ok(()),
                                    other => Err(format!("{other:?}")),
                                })
                                .collect(),
                        },
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let props = p.properties.unwrap_or_default();
                            NetEvent::Message(Message {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload,
                                correlation: props.correlation_data,
                            })
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => continue,
                        Err(rumqttc::v5::ConnectionError::RequestsDone) => return,
                        Err(e) => {
                            if let Some(f) = first.take() {
                                let _ = f.send(Err(first_error(refusal_v5(&e), e.to_string())));
                                return;
                            }
                            handler(NetEvent::Lost(e.to_string()));
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(RECONNECT_MAX);
                            continue;
                        }
                    };
                    handler(event);
                }
            });
            (Link::V5(client), task)
        }
        Protocol::V311 => {
            use rumqttc::{Event, MqttOptions, Packet, SubscribeReasonCode as R};
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
            let (client, mut eventloop) = rumqttc::AsyncClient::new(mo, REQUEST_CAPACITY);
            eventloop
                .network_options
                .set_connection_timeout(opts.connect_timeout.as_secs().max(1));
            // No Nagle delay (see the MQTT 5 branch).
            eventloop.network_options.set_tcp_nodelay(true);
            let mut handler = make_handler(Link::V4(client.clone()));
            let task = tokio::spawn(async move {
                let mut first = Some(first_tx);
                let mut backoff = RECONNECT_MIN;
                loop {
                    let event = match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            backoff = RECONNECT_MIN;
                            if let Some(f) = first.take() {
                                let _ = f.send(Ok(()));
                            }
                            NetEvent::Connected
                        }
                        Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                            NetEvent::Subscribing(pkid)
                        }
                        Ok(Event::Incoming(Packet::SubAck(ack))) => NetEvent::SubAck {
                            pkid: ack.pkid,
                            results: ack
                                .return_codes
                                .iter()
                                .map(|c| match c {
                                    R::Success(_) => Ok(()),
                                    R::Failure => Err("Failure".to_owned()),
                                })
                                .collect(),
                        },
                        Ok(Event::Incoming(Packet::Publish(p))) => NetEvent::Message(Message {
                            topic: p.topic,
                            payload: p.payload,
                            correlation: None,
                        }),
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => continue,
                        Err(rumqttc::ConnectionError::RequestsDone) => return,
                        Err(e) => {
                            if let Some(f) = first.take() {
                                let _ = f.send(Err(first_error(refusal_v4(&e), e.to_string())));
                                return;
                            }
                            handler(NetEvent::Lost(e.to_string()));
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(RECONNECT_MAX);
                            continue;
                        }
                    };
                    handler(event);
                }
            });
            (Link::V4(client), task)
        }
    };
    // rumqttc's own connection timeout bounds the TCP/TLS/CONNECT exchange;
    // this outer bound only guards against a task that never reports.
    let bound = opts.connect_timeout + Duration::from_secs(5);
    match tokio::time::timeout(bound, first_rx).await {
        Ok(Ok(Ok(()))) => Ok((link, task)),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(ClientError::Connection(
            "the MQTT poll loop ended before CONNACK".to_owned(),
        )),
        Err(_) => {
            task.abort();
            Err(ClientError::Connection(format!(
                "no CONNACK from {}:{} within {bound:?}",
                opts.host, opts.port
            )))
        }
    }
}
