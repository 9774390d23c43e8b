//! Short real runs of every scenario against a `roomcast standalone` started for the test
//! (build the workspace first: `cargo build --workspace`). Each system is killed when its test
//! ends, pass or fail, and each run is bounded.

use std::process::Stdio;
use std::time::Duration;

use roomcast_integration::{ClusterOptions, Standalone};
use serde_json::Value;

/// Longest a loadgen run may take in these tests.
const RUN_LIMIT: Duration = Duration::from_secs(30);

async fn standalone() -> Standalone {
    Standalone::start(ClusterOptions::default())
        .await
        .expect("starting roomcast standalone")
}

/// Runs loadgen with `args`; returns exit success, stdout and stderr.
async fn loadgen(args: &[String]) -> (bool, String, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .env_remove("JWT_SECRET")
        .env_remove("LOADGEN_TOKEN")
        .env_remove("API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning loadgen");
    let out = tokio::time::timeout(RUN_LIMIT, child.wait_with_output())
        .await
        .expect("loadgen did not finish in time")
        .expect("waiting for loadgen");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs loadgen, which must succeed; returns its final JSON object (the last stdout line).
async fn report(args: &[String]) -> Value {
    let (ok, stdout, stderr) = loadgen(args).await;
    assert!(ok, "loadgen {args:?} failed:\n{stderr}\n{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A `publish-api --json` run against `system` with its secret and API key, plus `more`.
async fn publish_api(system: &Standalone, more: &[&str]) -> Value {
    let opts = system.options();
    let (ws, grpc) = (system.ws_url(), system.room_service_grpc());
    let mut args = vec![
        "publish-api",
        "--json",
        "--url",
        &ws,
        "--secret",
        &opts.secret,
        "--grpc",
        &grpc,
        "--api-key",
        &opts.api_key,
    ];
    args.extend_from_slice(more);
    report(&strings(&args)).await
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_opened_held_and_measured() {
    let system = standalone().await;
    let pid = system.process().pid().to_string();
    let mut args = strings(&[
        "connections",
        "--url",
        &system.ws_url(),
        "--secret",
        &system.options().secret,
        "--count",
        "200",
        "--rate",
        "0",
        "--hold",
        "1s",
        "--gateway-pid",
        &pid,
    ]);
    // Human summary first, then the JSON object.
    let (ok, stdout, stderr) = loadgen(&args).await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("connections: 200 of 200 connected"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().filter(|l| l.starts_with('{')).count(), 1);

    args.push("--json".into());
    let r = report(&args).await;
    assert_eq!(r["scenario"], "connections");
    assert_eq!(u(&r, "attempted"), 200);
    assert_eq!(u(&r, "connected"), 200, "{r}");
    assert_eq!(u(&r, "failed"), 0, "{r}");
    assert_eq!(u(&r, "held"), 200, "{r}");
    assert_eq!(r["failures"], serde_json::json!({}));
    assert_eq!(r["connect_ms"]["count"], 200);
    assert!(r["connect_ms"]["p99"].as_f64().unwrap() > 0.0);
    assert!(r["connect_rate"].as_f64().unwrap() > 0.0);
    assert_eq!(r["gateways"][0]["pid"].to_string(), pid);
    assert!(u(&r["gateways"][0], "rss_after_kb") > 0);
    // A number, but not necessarily positive: the gateway returns freed heap to the OS after
    // connection churn (the first run's connections), which can outweigh 200 connections.
    assert!(
        r["rss_per_connection_bytes"].as_f64().unwrap().is_finite(),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_split_over_worker_processes() {
    let system = standalone().await;
    let r = report(&strings(&[
        "connections",
        "--json",
        "--url",
        &system.ws_url(),
        "--secret",
        &system.options().secret,
        "--count",
        "301",
        "--rate",
        "1000",
        "--hold",
        "500ms",
        "--workers",
        "3",
    ]))
    .await;
    assert_eq!(u(&r, "workers"), 3);
    assert_eq!(u(&r, "connected"), 301, "{r}");
    assert_eq!(u(&r, "held"), 301, "{r}");
    assert_eq!(r["connect_ms"]["count"], 301);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_everything_in_order() {
    let system = standalone().await;
    let r = report(&strings(&[
        "fanout",
        "--json",
        "--url",
        &system.ws_url(),
        "--secret",
        &system.options().secret,
        "--subscribers",
        "50",
        "--rooms",
        "2",
        "--rate",
        "200",
        "--duration",
        "2s",
        "--payload",
        "64",
        // Two per room, each well under the gateway's default per-connection publish rate.
        "--publishers",
        "4",
    ]))
    .await;
    assert_eq!(r["scenario"], "fanout");
    // 25 subscribers + 2 publishers per room.
    assert_eq!(u(&r, "members"), 54, "{r}");
    let published = u(&r, "published");
    assert!((380..=400).contains(&published), "{r}");
    assert_eq!(u(&r, "sent"), published + u(&r, "unacked"), "{r}");
    // Each publish reaches the room's 25 subscribers and the other publisher, not the sender.
    assert_eq!(u(&r, "expected"), published * 26, "{r}");
    assert_eq!(r["publish_errors"], serde_json::json!({}), "{r}");
    assert_eq!(u(&r, "received"), u(&r, "expected"), "{r}");
    assert_eq!(r["loss"], 0, "{r}");
    assert_eq!(u(&r, "out_of_order"), 0, "{r}");
    assert_eq!(u(&r, "gaps"), 0, "{r}");
    assert_eq!(u(&r, "publisher_order_violations"), 0, "{r}");
    assert_eq!(r["latency_ms"]["count"], r["received"]);
    let lat = &r["latency_ms"];
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(lat[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
    assert!(lat["p50"].as_f64() <= lat["p99"].as_f64());
    assert_eq!(r["ack_latency_ms"]["count"], published);
    let per_room: Vec<u64> = r["received_per_room"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(per_room.len(), 2);
    assert_eq!(per_room.iter().sum::<u64>(), u(&r, "received"));
    assert!(r["deliveries_per_sec"].as_f64().unwrap() > 1000.0, "{r}");
    assert_eq!(r["disconnected"], serde_json::json!({}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_steps_over_worker_processes() {
    let system = standalone().await;
    let pid = system.process().pid().to_string();
    let r = report(&strings(&[
        "fanout",
        "--json",
        "--url",
        &system.ws_url(),
        "--secret",
        &system.options().secret,
        "--subscribers",
        "40",
        "--rooms",
        "10",
        "--steps",
        "50,100",
        "--step-duration",
        "1s",
        "--step-pause",
        "100ms",
        "--max-p99",
        "10000",
        "--workers",
        "2",
        "--measure-pid",
        &format!("roomcast={pid}"),
    ]))
    .await;
    assert_eq!(u(&r, "workers"), 2, "{r}");
    // 4 subscribers + 1 publisher per room.
    assert_eq!(u(&r, "members"), 50, "{r}");
    let steps = r["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2, "{r}");
    for (step, rate) in steps.iter().zip([50.0, 100.0]) {
        assert_eq!(step["rate_target"].as_f64(), Some(rate), "{r}");
        assert_eq!(step["passed"], true, "{r}");
        let published = u(step, "published");
        assert!(published as f64 >= rate * 0.9, "{r}");
        // Each publish reaches the 4 subscribers of its room.
        assert_eq!(u(step, "expected"), published * 4, "{r}");
        assert_eq!(u(step, "received"), u(step, "expected"), "{r}");
        assert_eq!(step["latency_ms"]["count"], step["received"], "{r}");
        assert!(step["cpu_seconds"]["roomcast"].as_f64().is_some(), "{r}");
    }
    assert_eq!(
        u(&r, "received"),
        u(&steps[0], "received") + u(&steps[1], "received")
    );
    assert_eq!(u(&r, "out_of_order"), 0, "{r}");
    assert_eq!(u(&r, "gaps"), 0, "{r}");
    let per_room = r["received_per_room"].as_array().unwrap();
    assert_eq!(per_room.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_reaches_the_websocket_subscribers() {
    let system = standalone().await;
    let opts = system.options();
    let r = publish_api(
        &system,
        &[
            "--subscribers",
            "20",
            "--rooms",
            "2",
            "--rate",
            "100",
            "--duration",
            "1s",
        ],
    )
    .await;
    assert_eq!(r["scenario"], "publish-api");
    assert_eq!(u(&r, "members"), 20, "{r}");
    let published = u(&r, "published");
    assert!((90..=100).contains(&published), "{r}");
    // Each publish reaches all 10 subscribers of its room.
    assert_eq!(u(&r, "expected"), published * 10, "{r}");
    assert_eq!(r["loss"], 0, "{r}");
    assert_eq!(u(&r, "out_of_order"), 0, "{r}");
    assert_eq!(u(&r, "gaps"), 0, "{r}");
    assert!(r["publisher_order_violations"].is_null());
    assert_eq!(r["latency_ms"]["count"], r["received"]);

    // A wrong key is reported before any subscriber connects.
    let (ok, _, stderr) = loadgen(&strings(&[
        "publish-api",
        "--url",
        &system.ws_url(),
        "--secret",
        &opts.secret,
        "--grpc",
        &system.room_service_grpc(),
        "--api-key",
        "not-the-key",
        "--duration",
        "1s",
    ]))
    .await;
    assert!(!ok);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
}

/// `--batch`: the same publishes go out in `PublishBatch` calls; every one is acknowledged and
/// reaches every subscriber of its room, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_in_batches_reaches_the_websocket_subscribers() {
    let system = standalone().await;
    let r = publish_api(
        &system,
        &[
            "--subscribers",
            "20",
            "--rooms",
            "4",
            "--rate",
            "2000",
            "--batch",
            "64",
            "--max-in-flight",
            "128",
            "--duration",
            "1s",
        ],
    )
    .await;
    let published = u(&r, "published");
    assert!((1800..=2000).contains(&published), "{r}");
    assert_eq!(r["publish_errors"], serde_json::json!({}), "{r}");
    assert_eq!(u(&r, "unacked"), 0, "{r}");
    assert_eq!(u(&r, "expected"), published * 5, "{r}");
    assert_eq!(r["loss"], 0, "{r}");
    assert_eq!(u(&r, "out_of_order"), 0, "{r}");
    assert_eq!(u(&r, "gaps"), 0, "{r}");
}

/// Offered more than one call at a time can carry, the lanes fall behind their schedule: what
/// was not sent by the window's end is not sent at all, so every publish counted was sent in
/// the window and answered, and the run does not wait out its drain for a backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_sends_nothing_after_its_window() {
    let system = standalone().await;
    let started = std::time::Instant::now();
    let r = publish_api(
        &system,
        &[
            "--subscribers",
            "2",
            "--rooms",
            "2",
            "--rate",
            "100000",
            "--max-in-flight",
            "1",
            "--duration",
            "1s",
            "--drain",
            "20s",
        ],
    )
    .await;
    let sent = u(&r, "sent");
    assert!(sent > 0 && sent < 100_000, "{r}");
    assert_eq!(u(&r, "published"), sent, "{r}");
    assert_eq!(u(&r, "unacked"), 0, "{r}");
    assert_eq!(r["loss"], 0, "{r}");
    assert!(r["drain_seconds"].as_f64().unwrap() < 5.0, "{r}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_fails_the_handshakes() {
    let system = standalone().await;
    let r = report(&strings(&[
        "connections",
        "--json",
        "--url",
        &system.ws_url(),
        "--secret",
        "not-the-secret",
        "--count",
        "10",
        "--hold",
        "100ms",
    ]))
    .await;
    assert_eq!(u(&r, "connected"), 0, "{r}");
    assert_eq!(r["failures"]["http_401"], 10, "{r}");
}
