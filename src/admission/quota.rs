//! Limits above the session: a project's share of the queue, and what one
//! device may have in flight and admit per window (`identity = "topic"`).
//!
//! The per-session rules (2-4) cannot stop a device that rotates its
//! `sessionId`: every new id is a fresh session with a fresh window. So
//! two limits are kept beside them, checked after the session store has
//! admitted a request (a duplicate delivery must still be recognised as
//! one, not refused here):
//!
//! - **Queue shares.** A project may hold at most `queue_weight / (sum of
//!   the weights)` of the queue (at least one slot). Without it, one noisy
//!   project fills the queue and every other project's devices are told
//!   `overloaded`. A slot is held from admission until a worker takes the
//!   request. Hard shares leave room idle when only one project is busy; a
//!   single-project daemon (the common case) gets the whole queue, and the
//!   operator who serves several sets the weights to how much each may
//!   borrow.
//! - **Devices** (only where the broker vouches for the device id): at most
//!   `device_in_flight` requests queued or running, and `device_rate_limit`
//!   admitted per `rate_window`, over all of the device's sessions.
//!
//! What a request holds is a [`Held`] carried in the request itself, so
//! every path that ends a request (an answer, a refusal, a panic in a
//! worker, a shutdown) gives its slots back by dropping it.
//!
//! These counts are this instance's: with several instances behind a share
//! group each one enforces them on the requests it receives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use vllm_chat::protocol::ErrorCode;

use crate::config::ProjectConfig;
use crate::request::{Failure, SessionKey};
use crate::window::SlidingWindow;

/// Device entries kept before idle ones are swept (then twice the live
/// ones): sweeping is amortised over admissions, with no task of its own.
const SWEEP_FLOOR: usize = 1024;

/// One project's limits and its count of queued requests.
#[derive(Debug)]
struct ProjectQuota {
    /// Queue slots it may hold.
    share: usize,
    queued: Arc<AtomicUsize>,
    device_in_flight: u32,
    device_rate_limit: u32,
}

type DeviceId = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
struct Device {
    in_flight: u32,
    window: SlidingWindow,
}

#[derive(Debug)]
struct Devices {
    map: HashMap<DeviceId, Device>,
    sweep_at: usize,
}

/// The limits of every served project, and the devices' counts.
#[derive(Debug)]
pub struct Quotas {
    projects: HashMap<Arc<str>, ProjectQuota>,
    devices: Arc<Mutex<Devices>>,
    rate_window: Duration,
}

impl Quotas {
    /// Shares of a queue of `capacity` among `projects` by their
    /// `queue_weight`.
    pub fn new<'a>(
        projects: impl IntoIterator<Item = (&'a Arc<str>, &'a ProjectConfig)>,
        capacity: usize,
        rate_window: Duration,
    ) -> Self {
        let projects: Vec<_> = projects.into_iter().collect();
        let total: u64 = projects
            .iter()
            .map(|(_, p)| u64::from(p.queue_weight))
            .sum();
        let projects = projects
            .into_iter()
            .map(|(name, p)| {
                let share = (capacity as u64 * u64::from(p.queue_weight))
                    .checked_div(total)
                    .unwrap_or(capacity as u64);
                let quota = ProjectQuota {
                    share: (share as usize).clamp(1, capacity.max(1)),
                    queued: Arc::default(),
                    device_in_flight: p.device_in_flight,
                    device_rate_limit: p.device_rate_limit,
                };
                (name.clone(), quota)
            })
            .collect();
        Self {
            projects,
            devices: Arc::new(Mutex::new(Devices {
                map: HashMap::new(),
                sweep_at: SWEEP_FLOOR,
            })),
            rate_window,
        }
    }

    /// Queue slots `project` may hold.
    pub fn share(&self, project: &str) -> Option<usize> {
        self.projects.get(project).map(|p| p.share)
    }

    /// Takes a queue slot for `key`'s project and, if the request names a
    /// device, one of its in-flight slots and a place in its window; or
    /// says which limit refused it (and nothing is taken).
    pub fn acquire(&self, key: &SessionKey, now: Instant) -> Result<Held, Failure> {
        let Some(project) = self.projects.get(&key.project) else {
            // Not a served project: ingress never routes one here.
            return Ok(Held::default());
        };
        if project.queued.load(Ordering::Acquire) >= project.share {
            return Err(Failure::fixed(ErrorCode::Overloaded));
        }
        let device = match &key.device {
            None => None,
            Some(device) => {
                let id = (key.project.clone(), device.clone());
                let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
                devices.sweep(now, self.rate_window);
                let d = devices.map.entry(id.clone()).or_default();
                if d.in_flight >= project.device_in_flight {
                    return Err(Failure::fixed(ErrorCode::SessionBusy));
                }
                if let Err(retry) =
                    d.window
                        .try_acquire(now, project.device_rate_limit, self.rate_window)
                {
                    return Err(Failure::fixed(ErrorCode::RateLimited).retry_after(retry));
                }
                d.in_flight += 1;
                Some(DeviceSlot {
                    devices: self.devices.clone(),
                    id,
                })
            }
        };
        project.queued.fetch_add(1, Ordering::AcqRel);
        Ok(Held {
            queued: Some(QueueSlot(project.queued.clone())),
            device,
        })
    }

    /// Device entries held now.
    pub fn devices(&self) -> usize {
        self.devices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }
}

impl Devices {
    /// Forgets devices with nothing in flight and an empty window, once the
    /// map has grown to `sweep_at`.
    fn sweep(&mut self, now: Instant, window: Duration) {
        if self.map.len() < self.sweep_at {
            return;
        }
        self.map
            .retain(|_, d| d.in_flight > 0 || !d.window.is_idle(now, window));
        self.sweep_at = (self.map.len() * 2).max(SWEEP_FLOOR);
    }
}

/// The slots one request holds; dropping it gives them back.
#[derive(Debug, Default)]
pub struct Held {
    queued: Option<QueueSlot>,
    device: Option<DeviceSlot>,
}

impl Held {
    /// A worker has taken the request: its queue slot is free, its device
    /// slot is kept until it is answered.
    pub fn dequeued(&mut self) {
        self.queued = None;
    }

    /// The request was refused after all (the queue itself was full): give
    /// the device's window place back too, as if it had never come.
    pub fn refund(mut self) {
        if let Some(slot) = self.device.take() {
            let mut devices = slot.devices.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(d) = devices.map.get_mut(&slot.id) {
                d.window.undo_last();
            }
            drop(devices);
            drop(slot);
        }
    }
}

#[derive(Debug)]
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct DeviceSlot {
    devices: Arc<Mutex<Devices>>,
    id: DeviceId,
}

impl Drop for DeviceSlot {
    fn drop(&mut self) {
        let mut devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(d) = devices.map.get_mut(&self.id) {
            d.in_flight = d.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(project: &str, device: Option<&str>, session: &str) -> SessionKey {
        SessionKey {
            project: Arc::from(project),
            device: device.map(Arc::from),
            session: session.into(),
            ephemeral: false,
        }
    }

    fn quotas(projects: &[(&str, ProjectConfig)], capacity: usize) -> Quotas {
        let named: Vec<(Arc<str>, ProjectConfig)> = projects
            .iter()
            .map(|(n, p)| (Arc::from(*n), p.clone()))
            .collect();
        Quotas::new(
            named.iter().map(|(n, p)| (n, p)),
            capacity,
            Duration::from_secs(60),
        )
    }

    fn weighted(w: u32) -> ProjectConfig {
        ProjectConfig {
            queue_weight: w,
            ..Default::default()
        }
    }

    #[test]
    fn shares_follow_the_weights_and_a_lone_project_gets_the_queue() {
        let q = quotas(&[("a", weighted(3)), ("b", weighted(1))], 100);
        assert_eq!(q.share("a"), Some(75));
        assert_eq!(q.share("b"), Some(25));
        let q = quotas(&[("solo", weighted(1))], 100);
        assert_eq!(q.share("solo"), Some(100));
        // Never zero, never above the queue.
        let q = quotas(&[("a", weighted(1000)), ("b", weighted(1))], 10);
        assert_eq!((q.share("a"), q.share("b")), (Some(9), Some(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_project_at_its_share_is_overloaded_and_others_are_not() {
        let q = quotas(&[("noisy", weighted(1)), ("quiet", weighted(1))], 4);
        let now = Instant::now();
        let mut held: Vec<Held> = (0..2)
            .map(|i| {
                q.acquire(&key("noisy", None, &format!("s{i}")), now)
                    .unwrap()
            })
            .collect();
        let refused = q.acquire(&key("noisy", None, "s9"), now).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Overloaded);
        // The other project's share is untouched.
        let quiet = q.acquire(&key("quiet", None, "s1"), now).unwrap();
        // A worker takes one of noisy's requests: its slot is free again.
        held[0].dequeued();
        q.acquire(&key("noisy", None, "s9"), now).unwrap();
        drop((held, quiet));
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_is_limited_over_all_its_sessions() {
        let p = ProjectConfig {
            device_in_flight: 2,
            device_rate_limit: 3,
            ..Default::default()
        };
        let q = quotas(&[("p", p)], 100);
        let t0 = Instant::now();
        let a = q.acquire(&key("p", Some("dev"), "s1"), t0).unwrap();
        let b = q.acquire(&key("p", Some("dev"), "s2"), t0).unwrap();
        // Rotating sessionIds: a third one is refused while two run.
        let busy = q.acquire(&key("p", Some("dev"), "s3"), t0).unwrap_err();
        assert_eq!(busy.code, ErrorCode::SessionBusy);
        // Another device is not affected.
        let other = q.acquire(&key("p", Some("other"), "s1"), t0).unwrap();
        // Answered (dropped): in flight again, then the window refuses.
        drop(a);
        let c = q.acquire(&key("p", Some("dev"), "s4"), t0).unwrap();
        drop((b, c));
        let limited = q
            .acquire(&key("p", Some("dev"), "s5"), t0 + Duration::from_secs(1))
            .unwrap_err();
        assert_eq!(limited.code, ErrorCode::RateLimited);
        assert_eq!(limited.retry_after, Some(Duration::from_secs(59)));
        // A refund (the queue was full after all) gives the place back.
        let t = t0 + Duration::from_secs(60);
        q.acquire(&key("p", Some("dev"), "s6"), t).unwrap().refund();
        let d = q.acquire(&key("p", Some("dev"), "s7"), t).unwrap();
        drop((d, other));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_devices_are_forgotten() {
        let q = quotas(&[("p", ProjectConfig::default())], 100);
        let t0 = Instant::now();
        for i in 0..SWEEP_FLOOR {
            drop(
                q.acquire(&key("p", Some(&format!("d{i}")), "s"), t0)
                    .unwrap(),
            );
        }
        assert_eq!(q.devices(), SWEEP_FLOOR);
        // A window later they are all idle: the next admission sweeps.
        let held = q
            .acquire(&key("p", Some("new"), "s"), t0 + Duration::from_secs(60))
            .unwrap();
        assert_eq!(q.devices(), 1);
        drop(held);
    }
}
