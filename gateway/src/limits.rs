//! Per-connection and per-user limits: a token bucket for publishes, and the count of open
//! connections per user on this gateway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Token bucket: `rate` tokens per second, at most `burst` saved up.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Time until the next token, for the error message.
    pub fn wait_hint(&self) -> Duration {
        Duration::try_from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
            .unwrap_or(Duration::MAX)
    }
}

/// Open connections per user on this gateway.
#[derive(Clone, Default)]
pub struct UserConnections {
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

/// One counted connection; dropping it gives the slot back (also when an upgrade never
/// completes and the callback holding it is dropped).
pub struct UserSlot {
    counts: Arc<Mutex<HashMap<String, usize>>>,
    user: String,
}

impl UserConnections {
    /// Counts one more connection of `user` unless it already has `limit` (0: no limit).
    pub fn try_acquire(&self, user: &str, limit: usize) -> Option<UserSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(user.to_owned()).or_insert(0);
        if limit > 0 && *count >= limit {
            return None;
        }
        *count += 1;
        Some(UserSlot {
            counts: self.counts.clone(),
            user: user.to_owned(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10.0, 3.0);
        assert!(bucket.try_take() && bucket.try_take() && bucket.try_take());
        assert!(!bucket.try_take());
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        tokio::time::advance(Duration::from_secs(10)).await;
        let taken = (0..10).filter(|_| bucket.try_take()).count();
        assert_eq!(taken, 3, "never more than the burst");
    }

    #[test]
    fn user_slots_are_counted_and_given_back() {
        let users = UserConnections::default();
        let a = users.try_acquire("u", 2).unwrap();
        let _b = users.try_acquire("u", 2).unwrap();
        assert!(users.try_acquire("u", 2).is_none());
        assert!(users.try_acquire("v", 2).is_some());
        drop(a);
        assert!(users.try_acquire("u", 2).is_some());
        assert!(users.try_acquire("u", 0).is_some(), "0 means no limit");
    }
}
