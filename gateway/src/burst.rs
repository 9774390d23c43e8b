//! Whether the fan-out is behind, so that it leaves writing to the connections' writers.
//!
//! A direct write from the fan-out ([`crate::outbound`]) saves a task wake-up per delivery but
//! costs one write call per message and recipient. When the fan-out falls behind, a room's
//! next messages are already waiting: written directly, each would cost its own write call
//! again, and the fan-out would fall further behind (1000 × 200 msg/s on a slow machine: 16 s
//! p99 and lost messages with direct writes, 0.12 s without). Queued instead, what piles up
//! for a connection goes out in one write.
//!
//! A broker payload that arrives within [`BURST_GAP`] of the end of the previous one's fan-out
//! was already waiting (it came in the same read from the broker): such payloads form one
//! burst. A room's first message or event of a burst may be written directly; the rest of its
//! burst is queued, so each connection's writer coalesces it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Least pause between two payloads' fan-outs that ends a burst. A payload read from the
/// broker's socket after a wait comes at least a read call later; one parsed from the same
/// read comes within a few microseconds.
pub const BURST_GAP: Duration = Duration::from_micros(50);

/// Numbers bursts of broker payloads (see the module docs). Several broker connections may
/// feed the fan-out at once; their payloads then count as one stream, which only makes a
/// burst look longer.
#[derive(Debug)]
pub struct Bursts {
    /// [`BURST_GAP`], but for tests.
    gap: Duration,
    origin: Instant,
    /// When the last fan-out ended, in nanoseconds since `origin`.
    last_end: AtomicU64,
    current: AtomicU32,
}

impl Default for Bursts {
    fn default() -> Self {
        Self::with_gap(BURST_GAP)
    }
}

impl Bursts {
    /// Bursts ended by pauses of at least `gap`.
    pub fn with_gap(gap: Duration) -> Self {
        Self {
            gap,
            origin: Instant::now(),
            last_end: AtomicU64::new(0),
            current: AtomicU32::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A payload's fan-out starts: the number of the burst it belongs to.
    pub fn begin(&self) -> u32 {
        let gap = self
            .now()
            .saturating_sub(self.last_end.load(Ordering::Relaxed));
        if u128::from(gap) >= self.gap.as_nanos() {
            // Wrapping: only equality between a room's mark and the current burst matters.
            self.current.fetch_add(1, Ordering::Relaxed).wrapping_add(1)
        } else {
            self.current.load(Ordering::Relaxed)
        }
    }

    /// The payload's fan-out is done.
    pub fn end(&self) {
        self.last_end.store(self.now(), Ordering::Relaxed);
    }
}

/// A room's mark: the burst in which it last let the fan-out write directly.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectMark(Option<u32>);

impl DirectMark {
    /// Whether a payload of burst `burst` may be written directly: only the room's first in
    /// that burst.
    pub fn take(&mut self, burst: u32) -> bool {
        if self.0 == Some(burst) {
            return false;
        }
        self.0 = Some(burst);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_back_to_back_share_a_burst_and_a_pause_ends_it() {
        // A gap long enough that a busy test machine does not end a burst by itself.
        let gap = Duration::from_millis(300);
        let bursts = Bursts::with_gap(gap);
        let first = bursts.begin();
        bursts.end();
        // Straight after the previous fan-out: the same burst.
        assert_eq!(bursts.begin(), first);
        bursts.end();
        std::thread::sleep(gap + gap / 2);
        let next = bursts.begin();
        assert_ne!(next, first);
        bursts.end();
        assert_eq!(bursts.begin(), next);
    }

    #[test]
    fn a_room_writes_directly_once_per_burst() {
        let mut mark = DirectMark::default();
        assert!(mark.take(7));
        assert!(!mark.take(7));
        assert!(!mark.take(7));
        assert!(mark.take(8));
        assert!(!mark.take(8));
    }
}
