//! What every task of a delivery run shares: the context, the publishing window, and the live
//! counters of the run and of each step. Members (`member.rs`), server-API lanes
//! (`api_lane.rs`) and the engine (`delivery.rs`) all count into these.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::Dialer;
use crate::report::{Reasons, SharedHistogram};

/// What every task of a run shares.
pub struct Ctx {
    pub dialer: Dialer,
    /// Every room of the run (all processes), by number.
    pub rooms: Vec<String>,
    pub shared: Shared,
    /// Cancelled when the run ends (after the last drain, or on interrupt).
    pub stop: CancellationToken,
    /// The current publishing window; `None` until the first.
    pub window: watch::Receiver<Option<Window>>,
    pub join_timeout: Duration,
    /// The `p` string of every payload.
    pub filler: String,
    /// Put the step number in each payload (`--steps` runs).
    pub tag_steps: bool,
}

/// One publishing window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub step: usize,
    pub begin: Instant,
    pub end: Instant,
    /// Total rate over all publishers of the run.
    pub rate: f64,
}

/// Live counters: the run's totals, and each step's own.
pub struct Shared {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub joined_per_room: Vec<AtomicU64>,
    pub setup_resolved: AtomicU64,
    /// Publishers (WebSocket members, or lanes) that joined and will take part in steps.
    pub publishers_joined: AtomicU64,
    /// Publishers whose connection ended: they take no part in later steps.
    pub publishers_gone: AtomicU64,
    /// Members whose connection ended after they joined.
    pub disconnects: AtomicU64,
    steps: Vec<OnceLock<StepStats>>,
    rooms: usize,
}

/// One step's counters.
pub struct StepStats {
    pub latency: SharedHistogram,
    pub ack_latency: SharedHistogram,
    pub received: AtomicU64,
    pub out_of_order: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub acked_per_room: Vec<AtomicU64>,
    pub errors: Mutex<Reasons>,
    pub publishers_done: AtomicU64,
    /// Latest delivery, ns since the Unix epoch.
    pub last_delivery_ns: AtomicU64,
}

impl StepStats {
    pub fn new(rooms: usize) -> StepStats {
        StepStats {
            latency: SharedHistogram::default(),
            ack_latency: SharedHistogram::default(),
            received: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            acked_per_room: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            errors: Mutex::new(Reasons::new()),
            publishers_done: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
        }
    }

    pub fn error(&self, code: &str) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code.to_owned())
            .or_default() += 1;
    }

    pub fn errors(&self) -> Reasons {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Shared {
    pub fn new(rooms: usize, steps: usize) -> Shared {
        Shared {
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            joined_per_room: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            setup_resolved: AtomicU64::new(0),
            publishers_joined: AtomicU64::new(0),
            publishers_gone: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            steps: (0..steps.max(1)).map(|_| OnceLock::new()).collect(),
            rooms,
        }
    }

    /// Step `k`'s counters, once the step has begun.
    pub fn step(&self, k: usize) -> Option<&StepStats> {
        self.steps.get(k)?.get()
    }

    /// Step `k`'s counters, made when the step begins.
    pub fn open_step(&self, k: usize) -> Option<&StepStats> {
        Some(
            self.steps
                .get(k)?
                .get_or_init(|| StepStats::new(self.rooms)),
        )
    }

    /// Deliveries step `k`'s acknowledged publishes call for so far.
    pub fn expected(&self, k: usize, sender_is_member: bool) -> u64 {
        let Some(st) = self.step(k) else { return 0 };
        st.acked_per_room
            .iter()
            .zip(&self.joined_per_room)
            .map(|(acked, joined)| {
                let members = joined.load(SeqCst);
                let recipients = if sender_is_member {
                    members.saturating_sub(1)
                } else {
                    members
                };
                acked.load(SeqCst) * recipients
            })
            .sum()
    }
}

/// Counts a step's publishers done, once each (used by members and lanes).
pub fn step_done(shared: &Shared, step: usize) {
    if let Some(st) = shared.step(step) {
        st.publishers_done.fetch_add(1, SeqCst);
    }
}
