//! The ingress stage: the task that polls rumqttc's event loop.
//!
//! It only polls, decodes and hands off. Every outgoing packet (replies,
//! acks, status) travels through the event loop this task polls, so if it
//! ever awaited another stage that is itself waiting on a publish, the
//! daemon would deadlock once rumqttc's request channel filled. So nothing
//! here awaits anything but `poll()`: requests go to admission with
//! `try_send`, immediate replies to egress with `try_send`.
//!
//! Decoding includes validation (rule 1 of admission, a pure function):
//! a request that fails it is answered `bad_request` from here, and one
//! that finds the admission channel full is answered `overloaded`, so a
//! device always hears back at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop};
use rumqttc::Outgoing;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vllm_chat::protocol::{request_topic, ErrorCode};

use crate::admission::validate::{self, Limits};
use crate::backoff::Reconnect;
use crate::cancel::Cancels;
use crate::circuit::Circuits;
use crate::config::{Identity, ProjectConfig};
use crate::error::AppError;
use crate::mqtt::egress::Egress;
use crate::mqtt::status::StatusMessages;
use crate::request::{AckToken, Failure, Inbound, Outbound, ReplyBody, Request, SessionKey};
use crate::telemetry::{Event as Ev, Stats};

/// How long we keep reading after our DISCONNECT, waiting for the broker to
/// close the connection (see [`linger`]).
const DISCONNECT_LINGER: Duration = Duration::from_secs(2);

/// How long a connection must stay up before the reconnect delay starts
/// over from its minimum.
const STABLE_CONNECTION: Duration = Duration::from_secs(60);

/// A served project: its settings, by request topic.
#[derive(Debug)]
pub struct Project {
    pub name: Arc<str>,
    pub settings: ProjectConfig,
}

/// Everything the poll loop needs.
pub struct Ingress {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
    /// `{project}/user_input` -> project (a device identity project's
    /// requests come one level below it).
    pub projects: HashMap<String, Arc<Project>>,
    pub limits: Limits,
    pub admission: mpsc::Sender<Request>,
    pub egress: Egress,
    pub stats: Arc<Stats>,
    pub status: StatusMessages,
    /// The backends' circuits, for the status published on (re)connect.
    pub circuits: Circuits,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Subscribe through `$share/{group}/` (several instances as one).
    pub share_group: Option<String>,
    /// Admitted requests' cancel tokens (`{project}/cancel`).
    pub cancels: Arc<Cancels>,
}

/// `{project}/cancel`
fn cancel_topic(project: &str) -> String {
    format!("{project}/cancel")
}

impl Project {
    /// The cancel subscription: `{project}/cancel`, or with a device
    /// identity `{project}/cancel/+` (the ACL binds the level to the user).
    pub fn cancel_filter(&self) -> String {
        match self.settings.identity {
            Identity::None => cancel_topic(&self.name),
            Identity::Topic => format!("{}/+", cancel_topic(&self.name)),
        }
    }

    /// What the daemon subscribes for this project: `{project}/user_input`,
    /// or with a device identity `{project}/user_input/+`.
    pub fn filter(&self) -> String {
        match self.settings.identity {
            Identity::None => request_topic(&self.name),
            Identity::Topic => format!("{}/+", request_topic(&self.name)),
        }
    }
}

/// Where a publish belongs.
enum Route<'a> {
    Project(&'a Arc<Project>, Option<Arc<str>>),
    /// A device identity project's topic whose device id cannot head a
    /// reply topic: nothing can be answered.
    BadDevice(&'a Arc<Project>),
    /// Not ours (a subscription left by an earlier configuration).
    Unknown,
}

fn route<'a>(projects: &'a HashMap<String, Arc<Project>>, topic: &str) -> Route<'a> {
    if let Some(p) = projects.get(topic) {
        if p.settings.identity == Identity::None {
            return Route::Project(p, None);
        }
    }
    let Some((base, device)) = topic.rsplit_once('/') else {
        return Route::Unknown;
    };
    match projects.get(base) {
        Some(p) if p.settings.identity == Identity::Topic => {
            if validate::is_valid_device_id(&p.name, device) {
                Route::Project(p, Some(Arc::from(device)))
            } else {
                Route::BadDevice(p)
            }
        }
        _ => Route::Unknown,
    }
}

impl Ingress {
    /// Builds the topic table for `projects`.
    pub fn project_table(
        projects: impl IntoIterator<Item = Project>,
    ) -> HashMap<String, Arc<Project>> {
        projects
            .into_iter()
            .map(|p| (request_topic(&p.name), Arc::new(p)))
            .collect()
    }

    /// Polls until the client disconnects (after the app sent DISCONNECT,
    /// or `abort`). `accept` cancelled means shutting down: stop taking
    /// requests (QoS 1 ones stay unacknowledged for redelivery, QoS 0 ones
    /// are answered `shutting_down`) but keep polling so that replies, acks
    /// and the DISCONNECT go out.
    ///
    /// `poll()` is not cancel-safe: a request it has taken from rumqttc's
    /// channel is lost if the future is dropped before it is written (a
    /// reply or an ack, at shutdown). So it is raced only against `abort`,
    /// the last resort once the drain's deadline has passed; `accept` is
    /// read, not awaited.
    pub async fn run(
        self,
        accept: CancellationToken,
        abort: CancellationToken,
    ) -> Result<(), AppError> {
        let Ingress {
            client,
            mut eventloop,
            projects,
            limits,
            admission,
            egress,
            stats,
            status,
            circuits,
            reconnect_min,
            reconnect_max,
            share_group,
            cancels,
        } = self;
        // Stable after a minute, or after the longest delay if that is
        // longer: a poison message that gets us dropped right after each
        // CONNACK must not become a reconnect storm.
        let mut reconnect = Reconnect::new(
            reconnect_min,
            reconnect_max,
            reconnect_max.max(STABLE_CONNECTION),
        );
        let mut failing = false;
        let mut filters: Vec<Filter> = projects
            .values()
            .map(|p| {
                let filter = match &share_group {
                    Some(g) => format!("$share/{g}/{}", p.filter()),
                    None => p.filter(),
                };
                Filter::new(filter, QoS::AtLeastOnce)
            })
            .collect();
        // Cancels are never shared: every instance must see each one, as
        // only the one holding the request can act on it.
        filters.extend(
            projects
                .values()
                .map(|p| Filter::new(p.cancel_filter(), QoS::AtLeastOnce)),
        );
        let cancel_topics: HashMap<String, Arc<Project>> = projects
            .values()
            .map(|p| (cancel_topic(&p.name), p.clone()))
            .collect();
        let handoff = Handoff {
            cancel_topics: &cancel_topics,
            cancels: &cancels,
            projects: &projects,
            limits: &limits,
            egress: &egress,
            stats: &stats,
        };
        loop {
            let event = tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(()),
                ev = eventloop.poll() => ev,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    reconnect.connected(Instant::now());
                    failing = false;
                    stats.emit(Ev::MqttConnected {
                        session_present: ack.session_present,
                    });
                    // Subscribing again is idempotent, and needed whenever
                    // the broker lost our session.
                    announce(
                        &client,
                        &filters,
                        status.topic.clone(),
                        status.online(&circuits),
                    );
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as R;
                    for code in &ack.return_codes {
                        match code {
                            R::Success(_) => {}
                            other => tracing::error!(
                                reason = ?other,
                                "the broker refused a subscription: requests on it will not arrive"
                            ),
                        }
                    }
                    tracing::info!(topics = ?filters.iter().map(|f| &f.path).collect::<Vec<_>>(), "subscribed");
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let open = (!accept.is_cancelled()).then_some(&admission);
                    handoff.publish(p, open);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    linger(&mut eventloop, &abort).await;
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(fatal) = fatal(&e) {
                        return Err(fatal);
                    }
                    let error = e.to_string();
                    if failing {
                        tracing::debug!(%error, "MQTT reconnect failed");
                    } else {
                        stats.emit(Ev::MqttDisconnected { error: &error });
                        failing = true;
                    }
                    let wait = reconnect.failed(Instant::now());
                    tokio::select! {
                        _ = abort.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
}

/// After our DISCONNECT is written, reads until the broker closes the
/// connection (or `DISCONNECT_LINGER` passes). Closing a socket that still
/// has unread bytes (requests the broker sent meanwhile) makes the kernel
/// answer with a reset, and a broker that gets a reset throws away what it
/// had not read yet: the last replies and acks we wrote, and the DISCONNECT
/// itself (so the last will would go out too). What is read here is left
/// unacknowledged, for redelivery. The first error ends it: polling again
/// would reconnect.
async fn linger(eventloop: &mut EventLoop, abort: &CancellationToken) {
    let until = tokio::time::sleep(DISCONNECT_LINGER);
    tokio::pin!(until);
    loop {
        tokio::select! {
            biased;
            _ = abort.cancelled() => return,
            _ = &mut until => return,
            ev = eventloop.poll() => if ev.is_err() { return },
        }
    }
}

/// Queues SUBSCRIBE, then the retained online status (in that order: a
/// watcher that sees "online" may rely on the subscription). The poll loop
/// must never await rumqttc's request channel, so it tries without
/// waiting; when the channel is full (replies piled up while we were
/// disconnected), a task waits for room instead. Losing the SUBSCRIBE
/// there would leave the daemon connected and deaf.
fn announce(client: &AsyncClient, filters: &[Filter], topic: String, online: Vec<u8>) {
    let full = match client.try_subscribe_many(filters.to_vec()) {
        Ok(()) => match client.try_publish(topic.clone(), QoS::AtLeastOnce, true, online.clone()) {
            Ok(()) => return,
            Err(_) => None,
        },
        Err(_) => Some(filters.to_vec()),
    };
    tracing::warn!("the MQTT request channel is full: SUBSCRIBE and status wait for room");
    let client = client.clone();
    tokio::spawn(async move {
        if let Some(filters) = full {
            if let Err(e) = client.subscribe_many(filters).await {
                tracing::error!(error = %e, "cannot SUBSCRIBE: the connection is gone");
                return;
            }
        }
        if let Err(e) = client.publish(topic, QoS::AtLeastOnce, true, online).await {
            tracing::warn!(error = %e, "cannot publish the online status");
        }
    });
}

/// Errors that retrying would only hide: the broker refused who we are,
/// or TLS could not verify it. One classifier with the clients:
/// [`vllm_chat::tls::refusal_v5`].
fn fatal(e: &ConnectionError) -> Option<AppError> {
    vllm_chat::tls::refusal_v5(e).map(AppError::BrokerRefused)
}

/// The decode-and-hand-off half of the poll loop.
struct Handoff<'a> {
    /// `{project}/cancel` -> project.
    cancel_topics: &'a HashMap<String, Arc<Project>>,
    cancels: &'a Cancels,
    projects: &'a HashMap<String, Arc<Project>>,
    limits: &'a Limits,
    egress: &'a Egress,
    stats: &'a Stats,
}

impl Handoff<'_> {
    fn publish(&self, p: Publish, admission: Option<&mpsc::Sender<Request>>) {
        let ack = (p.qos != QoS::AtMostOnce).then_some(AckToken { pkid: p.pkid });
        let topic = String::from_utf8_lossy(&p.topic);
        if self.cancel(&topic, &p.payload) {
            if ack.is_some() {
                self.egress.try_send(Outbound { reply: None, ack });
            }
            return;
        }
        let (project, device) = match route(self.projects, &topic) {
            Route::Project(p, device) => (p, device),
            Route::BadDevice(p) => {
                self.stats.emit(Ev::Unanswerable {
                    project: &p.name,
                    reason: "device id unfit for a reply topic",
                });
                if ack.is_some() {
                    self.egress.try_send(Outbound { reply: None, ack });
                }
                return;
            }
            Route::Unknown => {
                // A subscription left in our persistent session by an
                // earlier configuration: acknowledge so it does not sit in
                // flight.
                self.stats.emit(Ev::Ignored { topic: &topic });
                if ack.is_some() {
                    self.egress.try_send(Outbound { reply: None, ack });
                }
                return;
            }
        };
        let Some(admission) = admission else {
            if ack.is_none() {
                // QoS 0 is not redelivered: say why it was not served.
                self.reject_decoded(project, device, p, ErrorCode::ShuttingDown, None);
            }
            // QoS 1: left unacknowledged; the broker delivers it again to
            // the next instance.
            return;
        };
        let props = p.properties.unwrap_or_default();
        let inbound = Inbound {
            project: project.name.clone(),
            device,
            payload: p.payload,
            response_topic: props.response_topic,
            correlation: props.correlation_data,
            expiry: props
                .message_expiry_interval
                .map(|s| Duration::from_secs(u64::from(s))),
            ack,
            dup: p.dup,
            received_at: Instant::now(),
        };
        let request = match validate::parse(&inbound, &project.settings, self.limits) {
            Ok(r) => r,
            Err(invalid) => {
                match invalid.reply {
                    Some(to) => {
                        self.stats.emit(Ev::Rejected {
                            project: &project.name,
                            code: invalid.failure.code,
                            reason: &invalid.failure.message,
                        });
                        self.egress.try_send(Outbound {
                            reply: Some((to, ReplyBody::Failure(invalid.failure))),
                            ack,
                        });
                    }
                    None => {
                        self.stats.emit(Ev::Unanswerable {
                            project: &project.name,
                            reason: &invalid.failure.message,
                        });
                        if ack.is_some() {
                            self.egress.try_send(Outbound { reply: None, ack });
                        }
                    }
                }
                return;
            }
        };
        if let Err(e) = admission.try_send(request) {
            let (code, request) = match e {
                mpsc::error::TrySendError::Full(r) => (ErrorCode::Overloaded, r),
                mpsc::error::TrySendError::Closed(r) => (ErrorCode::ShuttingDown, r),
            };
            self.reject(request, code);
        }
    }

    /// A cancel message, if `topic` is a cancel topic: acted on at once
    /// (tokens only; the worker answers). Anything malformed, or a cancel
    /// for nothing in flight, is counted and ignored.
    fn cancel(&self, topic: &str, payload: &[u8]) -> bool {
        let (project, device) = match self.cancel_topics.get(topic) {
            Some(p) if p.settings.identity == Identity::None => (p, None),
            _ => match topic.rsplit_once('/') {
                Some((base, device)) => match self.cancel_topics.get(base) {
                    Some(p)
                        if p.settings.identity == Identity::Topic
                            && validate::is_valid_device_id(&p.name, device) =>
                    {
                        (p, Some(Arc::from(device)))
                    }
                    _ => return false,
                },
                None => return false,
            },
        };
        let cancelled = crate::cancel::parse(payload).map_or(0, |(session, request_id)| {
            let key = SessionKey {
                project: project.name.clone(),
                device,
                session: session.into_boxed_str(),
                ephemeral: false,
            };
            self.cancels.cancel(&key, request_id.as_deref())
        });
        if cancelled == 0 {
            self.stats.emit(Ev::Ignored { topic });
        }
        true
    }

    fn reject(&self, request: Request, code: ErrorCode) {
        let failure = match code.fixed_message() {
            Some(_) => Failure::fixed(code),
            None => Failure::new(code, "the daemon is shutting down; try again shortly"),
        };
        self.stats.emit(Ev::Rejected {
            project: &request.key.project,
            code,
            reason: &failure.message,
        });
        self.egress.try_send(Outbound {
            reply: Some((request.reply, ReplyBody::Failure(failure))),
            ack: request.ack,
        });
    }

    /// Decodes only to find where to answer, then rejects with `code`.
    fn reject_decoded(
        &self,
        project: &Project,
        device: Option<Arc<str>>,
        p: Publish,
        code: ErrorCode,
        ack: Option<AckToken>,
    ) {
        let props = p.properties.unwrap_or_default();
        let inbound = Inbound {
            project: project.name.clone(),
            device,
            payload: p.payload,
            response_topic: props.response_topic,
            correlation: props.correlation_data,
            expiry: None,
            ack,
            dup: p.dup,
            received_at: Instant::now(),
        };
        match validate::parse(&inbound, &project.settings, self.limits) {
            Ok(r) => self.reject(r, code),
            Err(_) => self.stats.emit(Ev::Unanswerable {
                project: &project.name,
                reason: "bad request while shutting down",
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;
    use std::io;

    /// Which TLS failures are fatal is `vllm_chat::tls::is_fatal`'s test;
    /// this checks that `fatal` asks it, and refuses bad credentials.
    #[test]
    fn refusals_are_fatal_and_network_errors_are_not() {
        let reset = io::Error::new(io::ErrorKind::ConnectionReset, "reset by peer");
        assert!(fatal(&ConnectionError::Tls(rumqttc::TlsError::Io(reset))).is_none());
        assert!(fatal(&ConnectionError::Tls(rumqttc::TlsError::NoValidCertInChain)).is_some());
        for refused in [
            ConnectReturnCode::BadUserNamePassword,
            ConnectReturnCode::UnsupportedProtocolVersion,
        ] {
            assert!(fatal(&ConnectionError::ConnectionRefused(refused)).is_some());
        }
        assert!(fatal(&ConnectionError::ConnectionRefused(
            ConnectReturnCode::ServerUnavailable
        ))
        .is_none());
    }
}
