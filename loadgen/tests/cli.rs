//! Bad command lines are refused before anything connects, with a message that says why.

use std::process::{Command, Output};

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        // Credentials must come from the arguments of each case only.
        .env_remove("JWT_SECRET")
        .env_remove("LOADGEN_TOKEN")
        .env_remove("API_KEY")
        .output()
        .expect("running loadgen")
}

/// Exit status 2 (usage error), nothing on stdout, and `needle` in the message.
fn refused(args: &[&str], needle: &str) {
    let out = loadgen(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected {needle:?} in:\n{stderr}"
    );
}

#[test]
fn usage_errors() {
    refused(&[], "Usage");
    refused(&["stampede"], "unrecognized subcommand");
    refused(&["connections"], "no credentials");
    refused(&["connections", "--secret", "s", "--count", "0"], "--count");
    refused(
        &["connections", "--secret", "s", "--count", "lots"],
        "invalid value 'lots'",
    );
    refused(
        &["connections", "--secret", "s", "--hold", "10x"],
        "unknown unit",
    );
    refused(
        &["connections", "--secret", "s", "--workers", "0"],
        "expected `auto` or a number",
    );
    refused(
        &[
            "connections",
            "--secret",
            "s",
            "--url",
            "ws://192.0.2.1:8080/ws",
        ],
        "only 127.0.0.0/8 targets",
    );
    refused(
        &[
            "connections",
            "--secret",
            "s",
            "--url",
            "http://127.0.0.1:8080/ws",
        ],
        "scheme must be ws://",
    );
    refused(
        &[
            "connections",
            "--secret",
            "s",
            "--url",
            "ws://127.0.0.1:8080",
        ],
        "give the WebSocket path",
    );
    refused(
        &["connections", "--secret", "s", "--source-ips", "0"],
        "--source-ips",
    );
    refused(
        &[
            "fanout",
            "--token",
            "t",
            "--rooms",
            "4",
            "--publishers",
            "2",
        ],
        "every room needs a publisher",
    );
    refused(
        &[
            "fanout",
            "--token",
            "t",
            "--rooms",
            "4",
            "--subscribers",
            "3",
        ],
        "some rooms would have no subscriber",
    );
    refused(
        &["fanout", "--token", "t", "--rate=-5"],
        "not a positive rate",
    );
    refused(
        &["fanout", "--token", "t", "--duration", "0s"],
        "--duration",
    );
    refused(
        &["fanout", "--token", "t", "--steps", "100", "--rate", "5"],
        "cannot be used with",
    );
    refused(
        &["fanout", "--token", "t", "--steps", "100,0"],
        "not a positive rate",
    );
    refused(
        &["fanout", "--token", "t", "--measure-pid", "gateway"],
        "expected LABEL=PID",
    );
    refused(
        &[
            "fanout",
            "--token",
            "t",
            "--measure-redis",
            "r=localhost:6379",
        ],
        "is not IP:PORT",
    );
    refused(
        &["fanout", "--token", "t", "--protocol", "mqtt"],
        "invalid value 'mqtt'",
    );
    refused(&["publish-api", "--token", "t"], "needs --api-key");
    refused(
        &[
            "publish-api",
            "--token",
            "t",
            "--api-key",
            "k",
            "--grpc",
            "http://10.1.1.1:1",
        ],
        "only 127.0.0.0/8 targets",
    );
}

#[test]
fn help_lists_the_scenarios() {
    let out = loadgen(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for s in ["connections", "fanout", "publish-api"] {
        assert!(text.contains(s), "{s} missing from --help:\n{text}");
    }
}

#[test]
fn unreachable_gateway_is_a_clear_failure() {
    // Nothing listens on port 1: every connection fails, the run still reports and exits.
    let out = loadgen(&[
        "connections",
        "--json",
        "--secret",
        "s",
        "--url",
        "ws://127.0.0.1:1/ws",
        "--count",
        "5",
        "--hold",
        "100ms",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["connected"], 0);
    assert_eq!(report["failed"], 5);
    assert_eq!(report["failures"]["connection_refused"], 5);

    let out = loadgen(&[
        "fanout",
        "--secret",
        "s",
        "--url",
        "ws://127.0.0.1:1/ws",
        "--subscribers",
        "3",
        "--duration",
        "1s",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("set-up failed") && stderr.contains("connection_refused"),
        "{stderr}"
    );
}
