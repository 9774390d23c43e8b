//! Which rooms this instance refreshed lately. A publish that refreshes a room (`GETEX` on the
//! epoch, `PTTL` on the stream) costs Redis about 13,000 more instructions than one that only
//! reads the epoch (`bench/publish-cost/instructions.sh --lasting`: 94,000 → 82,000 per client
//! publish with its retry record). A refresh gives the epoch 1.25 TTL (`prelude.lua`), so for a
//! fifth of a TTL after it the room's publishes may go `lasting`: the room still lives at least
//! a TTL after its last publish. Forgetting a room only costs one refresh more.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Most rooms remembered; beyond, the ones past their window go, then all of them.
const MAX_ROOMS: usize = 100_000;

/// When a room was last refreshed, under which TTL.
#[derive(Clone, Copy)]
struct Refresh {
    at: Instant,
    ttl_ms: u64,
}

impl Refresh {
    /// Whether a publish at `now` with `ttl_ms` may skip the refresh. `at` was taken before the
    /// refreshing call was sent, so Redis refreshed later than that.
    fn covers(&self, ttl_ms: u64, now: Instant) -> bool {
        self.ttl_ms == ttl_ms && now.duration_since(self.at) < window(ttl_ms)
    }
}

/// How long after a refresh a room's publishes go `lasting`: a fifth of the TTL, which leaves
/// a twentieth of it for a lasting call to wait before Redis runs it.
fn window(ttl_ms: u64) -> Duration {
    Duration::from_millis(ttl_ms / 5)
}

#[derive(Default)]
pub(super) struct Lifetimes {
    rooms: Mutex<HashMap<String, Refresh>>,
}

impl Lifetimes {
    /// For each `(room, ttl_ms)`, whether its publish at `now` may skip the refresh.
    pub fn lasting<'r>(
        &self,
        rooms: impl Iterator<Item = (&'r str, u64)>,
        now: Instant,
    ) -> Vec<bool> {
        let known = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        rooms
            .map(|(room, ttl_ms)| known.get(room).is_some_and(|r| r.covers(ttl_ms, now)))
            .collect()
    }

    /// Records that publishes sent at `at` refreshed `rooms`.
    pub fn refreshed<'r>(&self, rooms: impl Iterator<Item = (&'r str, u64)>, at: Instant) {
        let mut known = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        for (room, ttl_ms) in rooms {
            if known.len() >= MAX_ROOMS && !known.contains_key(room) {
                let now = Instant::now();
                known.retain(|_, r| r.covers(r.ttl_ms, now));
                if known.len() >= MAX_ROOMS {
                    known.clear();
                }
            }
            known.insert(room.to_owned(), Refresh { at, ttl_ms });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_goes_lasting_for_a_fifth_of_its_ttl_under_that_ttl_only() {
        let lifetimes = Lifetimes::default();
        let now = Instant::now();
        let asked = |lifetimes: &Lifetimes, now| {
            lifetimes.lasting([("a", 1000), ("a", 2000), ("b", 1000)].into_iter(), now)
        };
        assert_eq!(asked(&lifetimes, now), [false, false, false]);
        lifetimes.refreshed([("a", 1000)].into_iter(), now);
        assert_eq!(asked(&lifetimes, now), [true, false, false]);
        let later = now + Duration::from_millis(199);
        assert_eq!(asked(&lifetimes, later), [true, false, false]);
        let later = now + Duration::from_millis(200);
        assert_eq!(asked(&lifetimes, later), [false, false, false]);
    }

    #[test]
    fn a_full_map_drops_the_rooms_past_their_window_first() {
        let lifetimes = Lifetimes::default();
        let now = Instant::now();
        let old = now - Duration::from_secs(1);
        let names: Vec<String> = (0..MAX_ROOMS).map(|i| format!("r{i}")).collect();
        lifetimes.refreshed(names.iter().map(|n| (n.as_str(), 1000)), old);
        lifetimes.refreshed([("fresh", 1000)].into_iter(), now);
        lifetimes.refreshed([("other", 1000)].into_iter(), now);
        let known = lifetimes.rooms.lock().unwrap();
        assert_eq!(known.len(), 2);
        assert!(known.contains_key("fresh") && known.contains_key("other"));
    }
}
