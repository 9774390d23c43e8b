//! What a run reports: the JSON objects (documented in README.md), their human summaries, and
//! the latency histograms behind the percentiles.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Counts by reason (failure reasons, close codes, error codes); sorted for stable output.
pub type Reasons = BTreeMap<String, u64>;

pub fn add_reasons(into: &mut Reasons, from: &Reasons) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// Latency histogram in microseconds, 1 µs to 10 min, 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A histogram several tasks record into, in shards (a task records into the shard of its
/// own key), so tasks on different threads seldom take the same lock. Samples are recorded as
/// they come: a sample held back in a task's buffer would miss the end of a step.
pub struct SharedHistogram(Vec<Mutex<Histogram<u64>>>);

const SHARDS: usize = 8;

impl Default for SharedHistogram {
    fn default() -> Self {
        SharedHistogram((0..SHARDS).map(|_| Mutex::new(new_histogram())).collect())
    }
}

impl SharedHistogram {
    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        self.0[(key % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// One sample, into the shard of `key` (the recording task's connection number).
    pub fn record(&self, key: u64, sample_us: u64) {
        self.shard(key).saturating_record(sample_us.max(1));
    }

    pub fn record_all(&self, samples_us: &[u64]) {
        let mut h = self.shard(0);
        for &v in samples_us {
            h.saturating_record(v.max(1));
        }
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.0 {
            let _ = all.add(&*shard.lock().unwrap_or_else(|e| e.into_inner()));
        }
        all
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| round3(us as f64 / 1000.0);
        Latency {
            count: h.len(),
            mean: round3(h.mean() / 1000.0),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }

    fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {} ms, p90 {} ms, p99 {} ms, p99.9 {} ms, max {} ms ({} samples)",
            self.p50, self.p90, self.p99, self.p999, self.max, self.count
        )
    }
}

/// Non-empty buckets of a histogram, so worker processes can hand theirs to the parent.
pub fn histogram_buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn histogram_from_buckets(into: &mut Histogram<u64>, buckets: &[(u64, u64)]) {
    for &(value, count) in buckets {
        into.saturating_record_n(value.max(1), count);
    }
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub fn per_second(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        (n as f64 / seconds * 10.0).round() / 10.0
    } else {
        0.0
    }
}

/// A gateway's resident memory around the hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GatewayRss {
    pub pid: u32,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionsReport {
    pub scenario: String,
    pub urls: Vec<String>,
    pub count: u64,
    pub workers: u32,
    pub source_ips: u8,
    pub rate_target: f64,
    pub attempted: u64,
    pub connected: u64,
    pub failed: u64,
    pub failures: Reasons,
    /// From the first attempt to the last connect attempt resolved.
    pub ramp_seconds: f64,
    /// Connections established per second over the ramp.
    pub connect_rate: f64,
    /// TCP connect to `connected` frame.
    pub connect_ms: Latency,
    pub hold_seconds: f64,
    /// Open at the end of the hold.
    pub held: u64,
    /// Connections the server ended during the hold, by close code or error.
    pub dropped: Reasons,
    pub gateways: Vec<GatewayRss>,
    pub rss_delta_kb: Option<i64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub interrupted: bool,
}

impl ConnectionsReport {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "connections: {} of {} connected ({} failed) over {} gateway URL(s), {} worker(s)",
            self.connected,
            self.count,
            self.failed,
            self.urls.len(),
            self.workers
        );
        let _ = writeln!(
            s,
            "  ramp {:.3} s, {} connections/s (target {})",
            self.ramp_seconds,
            self.connect_rate,
            if self.rate_target > 0.0 {
                format!("{}/s", self.rate_target)
            } else {
                "unlimited".into()
            }
        );
        let _ = writeln!(s, "  time to connect: {}", self.connect_ms.line());
        if !self.failures.is_empty() {
            let _ = writeln!(s, "  failures: {}", reasons_line(&self.failures));
        }
        let _ = writeln!(
            s,
            "  held {} for {:.1} s; dropped during hold: {}",
            self.held,
            self.hold_seconds,
            if self.dropped.is_empty() {
                "none".into()
            } else {
                reasons_line(&self.dropped)
            }
        );
        for g in &self.gateways {
            let _ = writeln!(
                s,
                "  gateway pid {}: RSS {} kB -> {} kB",
                g.pid,
                opt(g.rss_before_kb),
                opt(g.rss_after_kb)
            );
        }
        if let Some(per) = self.rss_per_connection_bytes {
            let _ = writeln!(
                s,
                "  gateway RSS per held connection: {per:.0} bytes ({:.2} KiB)",
                per / 1024.0
            );
        }
        if self.interrupted {
            let _ = writeln!(s, "  (interrupted)");
        }
        s
    }
}

/// The fan-out and publish-api report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub scenario: String,
    pub urls: Vec<String>,
    pub rooms: u32,
    pub subscribers: u32,
    pub publishers: u32,
    pub rate_target: f64,
    pub payload_bytes: usize,
    /// How long publishing ran (the requested duration unless interrupted).
    pub duration_seconds: f64,
    /// Connections that joined their room (subscribers, plus WebSocket publishers).
    pub members: u64,
    pub setup_failures: Reasons,
    pub setup_seconds: f64,
    pub sent: u64,
    /// Publishes acknowledged (`published` frame or ServerPublish reply).
    pub published: u64,
    pub publish_errors: Reasons,
    pub unacked: u64,
    pub published_per_sec: f64,
    /// Σ over acknowledged publishes of the room's members, less the sender.
    pub expected: u64,
    pub received: u64,
    /// expected − received (negative if something arrived twice).
    pub loss: i64,
    /// Deliveries whose offset was not above the previous one in that room.
    pub out_of_order: u64,
    /// Offsets skipped over (sum of the holes seen).
    pub gaps: u64,
    /// WebSocket publishers' messages seen out of their send order (null for publish-api,
    /// whose concurrent calls may be ordered either way).
    pub publisher_order_violations: Option<u64>,
    pub deliveries_per_sec: f64,
    /// Publish send time to delivery at the subscriber.
    pub latency_ms: Latency,
    /// Publish send time to its acknowledgement.
    pub ack_latency_ms: Latency,
    pub drain_seconds: f64,
    /// Member connections that ended during the run, by close code or error.
    pub disconnected: Reasons,
    pub received_per_room: Vec<u64>,
    pub interrupted: bool,
    /// `roomcast` or `socketio` (fanout only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Load generator processes (fanout only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// `spread` or `room` (fanout only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// A `--steps` run: one entry per step run, in order (the fields above are totals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepReport>>,
}

/// One publishing step of a `--steps` run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    pub rate_target: f64,
    /// 0 for the first try at this rate, 1 for the first retry, …
    pub attempt: u32,
    pub duration_seconds: f64,
    pub sent: u64,
    pub published: u64,
    pub publish_errors: Reasons,
    pub unacked: u64,
    pub published_per_sec: f64,
    pub expected: u64,
    pub received: u64,
    pub loss: i64,
    pub out_of_order: u64,
    pub deliveries_per_sec: f64,
    pub latency_ms: Latency,
    pub ack_latency_ms: Latency,
    pub drain_seconds: f64,
    /// Members disconnected during this step.
    pub disconnected: u64,
    /// Zero loss, every publish acknowledged, nobody dropped, p99 within --max-p99.
    pub passed: bool,
    /// Publishing start and drain end, ms since the Unix epoch.
    pub begin_unix_ms: f64,
    pub end_unix_ms: f64,
    /// CPU seconds (utime + stime) over publishing + drain, per --measure-pid label.
    pub cpu_seconds: BTreeMap<String, f64>,
    /// Of which user time.
    pub cpu_user_seconds: BTreeMap<String, f64>,
    /// Redis's own CPU seconds (INFO used_cpu_user + used_cpu_sys), per --measure-redis label.
    pub redis_cpu_seconds: BTreeMap<String, f64>,
    /// The load generator's processes (parent and workers).
    pub loadgen_cpu_seconds: f64,
}

impl DeliveryReport {
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} subscribers in {} room(s), {} publisher(s), {} msg/s target, {} B payload, {:.1} s",
            self.scenario,
            self.subscribers,
            self.rooms,
            self.publishers,
            self.rate_target,
            self.payload_bytes,
            self.duration_seconds
        );
        let _ = writeln!(
            s,
            "  set-up: {} members joined in {:.2} s{}",
            self.members,
            self.setup_seconds,
            if self.setup_failures.is_empty() {
                String::new()
            } else {
                format!("; failures: {}", reasons_line(&self.setup_failures))
            }
        );
        let _ = writeln!(
            s,
            "  published {} of {} sent ({}/s), unacked {}{}",
            self.published,
            self.sent,
            self.published_per_sec,
            self.unacked,
            if self.publish_errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {}", reasons_line(&self.publish_errors))
            }
        );
        let _ = writeln!(
            s,
            "  deliveries: {} received of {} expected (loss {}), {}/s; out of order {}, gaps {}",
            self.received,
            self.expected,
            self.loss,
            self.deliveries_per_sec,
            self.out_of_order,
            self.gaps
        );
        if self.publish_errors.contains_key("rate_limited") {
            let _ = writeln!(
                s,
                "  note: the gateway limits publishes per connection (PUBLISH_RATE, \
                 PUBLISH_BURST): add --publishers or raise the limit"
            );
        }
        let _ = writeln!(s, "  latency: {}", self.latency_ms.line());
        let _ = writeln!(s, "  ack latency: {}", self.ack_latency_ms.line());
        if !self.disconnected.is_empty() {
            let _ = writeln!(s, "  disconnected: {}", reasons_line(&self.disconnected));
        }
        for step in self.steps.iter().flatten() {
            let cpu: Vec<String> = step
                .cpu_seconds
                .iter()
                .chain(&step.redis_cpu_seconds)
                .map(|(k, v)| format!("{k} {v:.2} s"))
                .collect();
            let _ = writeln!(
                s,
                "  step {} msg/s{}: published {}/s, {} deliveries/s, loss {}, p50 {} ms, p99 {} ms{}{}",
                step.rate_target,
                if step.attempt > 0 { " (retry)" } else { "" },
                step.published_per_sec,
                step.deliveries_per_sec,
                step.loss,
                step.latency_ms.p50,
                step.latency_ms.p99,
                if cpu.is_empty() {
                    String::new()
                } else {
                    format!("; CPU {}", cpu.join(", "))
                },
                if step.passed { "" } else { " FAIL" }
            );
        }
        if self.interrupted {
            let _ = writeln!(s, "  (interrupted)");
        }
        s
    }
}

fn reasons_line(r: &Reasons) -> String {
    r.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

/// Prints the human summary (unless `json_only`) and then the JSON object on one line.
pub fn print<T: Serialize>(report: &T, human: &str, json_only: bool) -> anyhow::Result<()> {
    if !json_only {
        print!("{human}");
    }
    println!("{}", serde_json::to_string(report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_ms() {
        let mut h = new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(Latency::of(&new_histogram()), Latency::default());
    }

    #[test]
    fn buckets_round_trip() {
        let mut h = new_histogram();
        for v in [10, 10, 2000, 30_000] {
            h.record(v).unwrap();
        }
        let mut back = new_histogram();
        histogram_from_buckets(&mut back, &histogram_buckets(&h));
        assert_eq!(back.len(), 4);
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(back.max(), h.max());
    }

    #[test]
    fn shards_add_up() {
        let shared = SharedHistogram::default();
        for key in 0..100u64 {
            shared.record(key, 1000 + key);
        }
        let h = shared.snapshot();
        assert_eq!(h.len(), 100);
        assert_eq!(h.max(), h.highest_equivalent(1099));
    }
}
