//! The scenarios, and the pacing and clock helpers they share.

pub mod api_lane;
pub mod connections;
pub mod context;
pub mod delivery;
pub mod fanout;
pub mod member;
pub mod publish_api;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Nanoseconds since the Unix epoch: the clock publish timestamps use, shared by every
/// process on the machine (publishers and subscribers may sit in different processes).
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Open-loop pacing: event `k` is due at `start + k / rate`, whatever happened to earlier
/// ones, so a slow server cannot slow the offered load down.
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    start: Instant,
    /// `None`: no pacing.
    interval_ns: Option<u64>,
    next: u64,
}

impl Pacer {
    /// `rate` events per second from `start`; 0 means as fast as possible.
    pub fn new(start: Instant, rate: f64) -> Pacer {
        let interval_ns = (rate > 0.0).then(|| ((1e9 / rate).round() as u64).max(1));
        Pacer {
            start,
            interval_ns,
            next: 0,
        }
    }

    /// When the next event is due.
    pub fn due(&self) -> Instant {
        match self.interval_ns {
            Some(ns) => self.start + Duration::from_nanos(ns.saturating_mul(self.next)),
            None => self.start,
        }
    }

    /// Marks the next event as done.
    pub fn advance(&mut self) {
        self.next += 1;
    }

    /// Waits until the next event is due and counts it.
    pub async fn tick(&mut self) {
        let due = self.due();
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        self.advance();
    }
}

/// A fresh, random id, so every run gets its own rooms (and offsets start from scratch).
pub fn run_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_is_open_loop() {
        let start = Instant::now();
        let mut p = Pacer::new(start, 100.0);
        assert_eq!(p.due(), start);
        p.advance();
        assert_eq!(p.due(), start + Duration::from_millis(10));
        for _ in 0..9 {
            p.advance();
        }
        assert_eq!(p.due(), start + Duration::from_millis(100));
        let unpaced = Pacer::new(start, 0.0);
        assert_eq!(unpaced.due(), start);
    }
}
