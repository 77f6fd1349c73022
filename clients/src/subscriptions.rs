//! The client's reply subscriptions, one per project: wanted, sent, and
//! acknowledged on which connection.
//!
//! A request is published only once its project's subscription is
//! acknowledged on the current connection: a reply that comes before the
//! SUBACK may find no subscription and be dropped. We connect with a clean
//! session, so every (re)connection subscribes again, and a lost
//! connection puts every subscription back to pending.
//!
//! rumqttc does not say which packet id a SUBSCRIBE got until the poll
//! loop sees it go out, and SUBACKs carry only that id. Every SUBSCRIBE
//! has one filter and is queued under this module's lock, so the n-th
//! `Subscribing` event belongs to the n-th queued filter.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ClientError;
use crate::sync::lock;
use crate::transport::Link;

/// How long a subscription may stay unacknowledged before we send the
/// SUBSCRIBE again. Almost never needed: it heals the rare case where a
/// reconnect makes us lose track of which SUBACK answers which SUBSCRIBE.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq)]
enum SubState {
    /// Wanted; no SUBACK yet on the current connection.
    Pending,
    /// Acknowledged on the current connection.
    Active,
    /// The broker said no.
    Refused(String),
}

/// The subscriptions, shared by the poll loop and the callers.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    /// A `std` mutex (see [`crate::sync`]).
    subs: Mutex<Subs>,
    /// Bumped whenever a subscription or the connection changes state, to
    /// wake the callers waiting in [`ensure`](Self::ensure).
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Subs {
    /// The current connection's number (counting CONNACKs), `None` while
    /// it is down.
    connection: Option<u64>,
    filters: HashMap<String, SubState>,
    /// Filters of queued SUBSCRIBEs not yet seen going out, in order.
    queued: VecDeque<String>,
    /// Packet id -> filter, for SUBSCRIBEs sent and not yet acknowledged.
    in_flight: HashMap<u16, String>,
}

impl Subs {
    fn send(&mut self, link: &Link, filter: &str) {
        match link.try_subscribe(filter) {
            Ok(()) => self.queued.push_back(filter.to_owned()),
            // Full request channel: the caller's next wake-up (or the next
            // CONNACK) sends it again.
            Err(e) => tracing::debug!(%filter, error = %e, "cannot queue SUBSCRIBE yet"),
        }
    }
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            subs: Mutex::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl Subscriptions {
    fn notify(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Connection number `connection` is up: subscribe to everything again
    /// (a clean start: the broker forgot our subscriptions, and rumqttc
    /// dropped the SUBSCRIBEs it had not sent).
    pub(crate) fn connected(&self, connection: u64, link: &Link) {
        let mut subs = lock(&self.subs);
        subs.connection = Some(connection);
        subs.queued.clear();
        subs.in_flight.clear();
        let filters: Vec<String> = subs.filters.keys().cloned().collect();
        for f in &filters {
            subs.filters.insert(f.clone(), SubState::Pending);
            subs.send(link, f);
        }
        drop(subs);
        self.notify();
    }

    /// The connection dropped: what was acknowledged on it is gone, and
    /// nobody may publish until the next SUBACK. Returns whether it was up.
    pub(crate) fn lost(&self) -> bool {
        let mut subs = lock(&self.subs);
        let was_up = subs.connection.take().is_some();
        for state in subs.filters.values_mut() {
            if *state == SubState::Active {
                *state = SubState::Pending;
            }
        }
        was_up
    }

    /// The next queued SUBSCRIBE went out with packet id `pkid`.
    pub(crate) fn subscribing(&self, pkid: u16) {
        let mut subs = lock(&self.subs);
        if let Some(filter) = subs.queued.pop_front() {
            subs.in_flight.insert(pkid, filter);
        }
    }

    /// The SUBACK for packet `pkid` (one result: one filter per SUBSCRIBE).
    pub(crate) fn acked(&self, pkid: u16, results: Vec<Result<(), String>>) {
        let mut subs = lock(&self.subs);
        let Some(filter) = subs.in_flight.remove(&pkid) else {
            return;
        };
        let state = match results.into_iter().next() {
            Some(Ok(())) => SubState::Active,
            Some(Err(reason)) => {
                tracing::warn!(%filter, %reason, "the broker refused the reply subscription");
                SubState::Refused(reason)
            }
            None => return,
        };
        subs.filters.insert(filter, state);
        drop(subs);
        self.notify();
    }

    /// Whether the connection is up.
    pub(crate) fn is_connected(&self) -> bool {
        lock(&self.subs).connection.is_some()
    }

    /// Waits until the broker acknowledged `filter` on the current
    /// connection, subscribing first if nobody has; returns that
    /// connection's number. At `deadline`: [`ClientError::Connection`] if
    /// the connection is down, else [`ClientError::Timeout`] of `timeout`.
    pub(crate) async fn ensure(
        &self,
        link: &Link,
        filter: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<u64, ClientError> {
        let mut changed = self.changed.subscribe();
        loop {
            {
                let mut subs = lock(&self.subs);
                let connection = subs.connection;
                match (subs.filters.get(filter), connection) {
                    (Some(SubState::Active), Some(connection)) => return Ok(connection),
                    (Some(SubState::Refused(reason)), _) => {
                        return Err(ClientError::SubscriptionRefused {
                            filter: filter.to_owned(),
                            reason: reason.clone(),
                        })
                    }
                    (Some(_), _) => {}
                    (None, _) => {
                        subs.filters.insert(filter.to_owned(), SubState::Pending);
                        if connection.is_some() {
                            subs.send(link, filter);
                        }
                    }
                }
                changed.borrow_and_update();
            }
            let wake = (Instant::now() + RESUBSCRIBE_AFTER).min(deadline);
            match tokio::time::timeout_at(wake, changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ClientError::Connection("the client is closed".into())),
                Err(_) if Instant::now() >= deadline => {
                    return Err(if self.is_connected() {
                        ClientError::Timeout(timeout)
                    } else {
                        ClientError::Connection(
                            "not connected to the broker before the timeout".into(),
                        )
                    })
                }
                Err(_) => {
                    // Still no SUBACK: ask again (idempotent on the broker).
                    let mut subs = lock(&self.subs);
                    if subs.connection.is_some()
                        && subs.filters.get(filter) == Some(&SubState::Pending)
                    {
                        subs.send(link, filter);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link whose requests go nowhere (its event loop is never polled).
    fn link() -> (Link, rumqttc::EventLoop) {
        let (client, events) =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 16);
        (Link::V4(client), events)
    }

    fn state(s: &Subscriptions, filter: &str) -> Option<SubState> {
        lock(&s.subs).filters.get(filter).cloned()
    }

    #[tokio::test]
    async fn publishing_waits_for_the_suback_on_the_current_connection() {
        let (link, _events) = link();
        let s = Subscriptions::default();
        s.connected(1, &link);
        let deadline = Instant::now() + Duration::from_secs(5);
        let waiting = s.ensure(&link, "f", deadline, Duration::from_secs(5));
        let acking = async {
            // The SUBSCRIBE goes out, then the broker acknowledges it.
            tokio::task::yield_now().await;
            s.subscribing(7);
            s.acked(7, vec![Ok(())]);
        };
        let (connection, ()) = tokio::join!(waiting, acking);
        assert_eq!(connection.unwrap(), 1);

        // Lost: nobody may publish until the next connection's SUBACK.
        assert!(s.lost());
        assert!(!s.lost());
        assert_eq!(state(&s, "f"), Some(SubState::Pending));
        s.connected(2, &link);
        s.subscribing(1);
        s.acked(1, vec![Ok(())]);
        assert_eq!(
            s.ensure(&link, "f", deadline, Duration::ZERO)
                .await
                .unwrap(),
            2
        );
    }

    #[tokio::test]
    async fn a_refusal_is_typed_and_a_dead_connection_ends_at_the_deadline() {
        let (link, _events) = link();
        let s = Subscriptions::default();
        s.connected(1, &link);
        let soon = Instant::now() + Duration::from_millis(20);
        let err = s.ensure(&link, "f", soon, Duration::from_secs(1)).await;
        assert!(matches!(err, Err(ClientError::Timeout(_))), "{err:?}");
        s.subscribing(3);
        s.acked(3, vec![Err("NotAuthorized".into())]);
        let err = s.ensure(&link, "f", soon, Duration::ZERO).await;
        assert!(
            matches!(err, Err(ClientError::SubscriptionRefused { .. })),
            "{err:?}"
        );
        s.lost();
        let soon = Instant::now() + Duration::from_millis(20);
        let err = s.ensure(&link, "g", soon, Duration::from_secs(1)).await;
        assert!(matches!(err, Err(ClientError::Connection(_))), "{err:?}");
    }
}
