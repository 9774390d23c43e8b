//! Server pings that ride along with writes going out anyway.
//!
//! A WebSocket connection is pinged every heartbeat interval. A ping is two bytes, but sent
//! alone it costs a write system call and wakes the client, as much as a delivery: with
//! 50,000 connections and the default 10 s, 5,000 writes a second. So during the last quarter
//! of the interval before its ping is due, a connection's next write (a delivery, a reply)
//! carries the ping too, and the session's timer sends only the pings nothing carried. Pings
//! then come 7.5 to 10 s apart instead of 10: never later than without this, and an active
//! connection's pings cost no write of their own.
//!
//! The state is one atomic in the connection's handle, moved by two parties: the writers
//! (the writer task, the fan-out's direct write) take a ping that is due, and the session,
//! at its ping deadline, reopens the window from the ping that went, or sends it itself.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// An empty WebSocket ping, as the server sends it (unmasked).
pub const FRAME: &[u8] = &[0x89, 0x00];

/// The low 31 bits hold a time: milliseconds since [`origin`], wrapping every 24.8 days.
const TIME: u32 = 0x7fff_ffff;
/// Set: a ping went along at the time held, and the session has not seen it yet.
const SENT: u32 = 0x8000_0000;
/// Nothing rides along (SSE, where a ping is a comment nobody answers, or before the session
/// opened the window).
const OFF: u32 = u32::MAX;
/// A time this far behind now, or less, has come; further is in the future (wrapped).
const PAST: u32 = 1 << 30;

/// Not a stamp (stamps use the low 31 bits): no run clock is set.
const NO_RUN: u32 = u32::MAX;

thread_local! {
    /// While a fan-out writes a batch: its start, stamped ([`RunClock`]).
    static RUN_NOW: Cell<u32> = const { Cell::new(NO_RUN) };
}

/// Lets the writes of one fan-out batch read the clock once: while it lives, this thread's
/// ride-along checks take its start as now instead of reading the clock per recipient (about
/// 30 ns per read here: ~5% of the gateway's user CPU per delivery at 1000 × 200 msg/s). A
/// batch takes milliseconds against a window of a quarter of the interval, so a ping is at
/// most that much later, never earlier. Hold it only across code that does not await (the
/// task could move to another thread).
pub struct RunClock {
    outer: u32,
}

impl RunClock {
    pub fn start() -> Self {
        RunClock {
            outer: RUN_NOW.replace(stamp(Instant::now())),
        }
    }
}

impl Drop for RunClock {
    fn drop(&mut self) {
        RUN_NOW.set(self.outer);
    }
}

/// Now, stamped: the running batch's start under a [`RunClock`], the clock otherwise.
fn now_stamp() -> u32 {
    match RUN_NOW.get() {
        NO_RUN => stamp(Instant::now()),
        run => run,
    }
}

/// A connection's ride-along ping: 4 bytes.
#[derive(Debug)]
pub struct PingSlot(AtomicU32);

impl Default for PingSlot {
    fn default() -> Self {
        PingSlot(AtomicU32::new(OFF))
    }
}

/// What the session finds at its ping deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// No write carried the ping: the session sends it now; the window is reopened.
    Send,
    /// A write carried one, at this instant (at most an interval ago); the window is
    /// reopened from then.
    Carried(Instant),
}

impl PingSlot {
    /// Lets writes from `at` on carry the ping (see [`window_start`]).
    pub fn open(&self, at: Instant) {
        self.0.store(stamp(at), Ordering::Relaxed);
    }

    /// For a writer: whether to add a ping to the write it is making (then it must). True at
    /// most once per window.
    pub fn take(&self) -> bool {
        let state = self.0.load(Ordering::Relaxed);
        if state & SENT != 0 {
            return false;
        }
        let now = now_stamp();
        if !has_come(state, now) {
            return false;
        }
        self.0
            .compare_exchange(state, SENT | now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// For the session at its ping deadline (`now`), with pings every `interval`: whether to
    /// send the ping itself or when one went. Either way the next window is open.
    pub fn settle(&self, now: Instant, interval: Duration) -> Due {
        let state = self.0.load(Ordering::Relaxed);
        if state != OFF && state & SENT != 0 {
            // Writers leave a carried ping alone: only this call changes it.
            let ago = Duration::from_millis(u64::from(stamp(now).wrapping_sub(state) & TIME));
            let went = now.checked_sub(ago.min(interval)).unwrap_or(now);
            self.open(window_start(went, interval));
            return Due::Carried(went);
        }
        let next = stamp(window_start(now, interval));
        match self
            .0
            .compare_exchange(state, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => Due::Send,
            // A writer took it just now.
            Err(_) => self.settle(now, interval),
        }
    }
}

/// When writes may start carrying the ping that is due an `interval` after `last`: the last
/// quarter of the interval.
pub fn window_start(last: Instant, interval: Duration) -> Instant {
    last + interval - interval / 4
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// `at` as wrapping milliseconds since the origin, in the low 31 bits.
fn stamp(at: Instant) -> u32 {
    (at.saturating_duration_since(origin()).as_millis() as u32) & TIME
}

/// Whether the stamped time `at` has come by `now` (both wrapping, so "up to 12 days ago").
fn has_come(at: u32, now: u32) -> bool {
    now.wrapping_sub(at) & TIME < PAST
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);

    #[test]
    fn under_a_run_clock_writes_take_the_batch_start_as_now() {
        let slot = PingSlot::default();
        let run = RunClock::start();
        // The window opens just after the batch started: for its writes it has not come.
        slot.open(Instant::now() + Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(40));
        assert!(!slot.take(), "the batch started before the window");
        drop(run);
        assert!(slot.take(), "outside the batch the clock is read");
        // Nested clocks restore the outer one.
        let outer = RunClock::start();
        let slot = PingSlot::default();
        slot.open(Instant::now() + Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(40));
        drop(RunClock::start());
        assert!(!slot.take(), "the outer batch's start is back");
        drop(outer);
        assert!(slot.take());
    }

    #[test]
    fn nothing_rides_along_until_the_session_opens_the_window() {
        let slot = PingSlot::default();
        assert!(!slot.take());
        slot.open(Instant::now() + Duration::from_secs(5));
        assert!(!slot.take(), "the window is in the future");
        slot.open(Instant::now());
        assert!(slot.take());
        assert!(!slot.take(), "one ping per window");
    }

    #[test]
    fn a_carried_ping_reopens_the_window_from_when_it_went() {
        let slot = PingSlot::default();
        let start = Instant::now();
        slot.open(start);
        assert!(slot.take());
        // The session comes by 2 s later, at its deadline.
        let deadline = Instant::now() + Duration::from_secs(2);
        let Due::Carried(went) = slot.settle(deadline, INTERVAL) else {
            panic!("the ping went along");
        };
        let ago = deadline - went;
        assert!(
            ago >= Duration::from_millis(1_999) && ago <= Duration::from_millis(2_100),
            "{ago:?}"
        );
        // The next window opens three quarters of an interval after the carried ping.
        assert!(!slot.take());
        let state = slot.0.load(Ordering::Relaxed);
        let expected = stamp(start + Duration::from_millis(7_500));
        assert!(state.abs_diff(expected) <= 100, "{state} vs {expected}");
    }

    #[test]
    fn a_ping_nothing_carried_is_the_sessions_to_send() {
        let slot = PingSlot::default();
        let now = Instant::now();
        slot.open(now);
        assert_eq!(slot.settle(now, INTERVAL), Due::Send);
        assert!(
            !slot.take(),
            "the next window is three quarters of an interval away"
        );
        assert_eq!(
            slot.0.load(Ordering::Relaxed),
            stamp(now + Duration::from_millis(7_500))
        );
    }

    #[test]
    fn a_slot_never_opened_leaves_every_ping_to_the_session() {
        let slot = PingSlot::default();
        assert_eq!(slot.settle(Instant::now(), INTERVAL), Due::Send);
        // The session's settle opens it, though: a connection that is not to carry pings
        // (SSE) never calls it.
        assert!(!slot.take());
    }

    #[test]
    fn times_wrap() {
        assert!(has_come(TIME - 5, 3), "8 ms after, across the wrap");
        assert!(!has_come(3, TIME - 5), "8 ms before, across the wrap");
        assert!(has_come(100, 100));
    }
}
