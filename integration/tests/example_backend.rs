//! `examples/node-backend` (the Node backend calling the server API) against a real cluster:
//! it must run to the end, its idempotent publish must reach a member once and its batch in
//! order after it, the presence it prints must list that member, and its disconnect must close
//! the member's connection with the code it asked for.
//!
//! Needs `node` on PATH and the example's dependencies (`npm ci --prefix
//! examples/node-backend`, which `scripts/test.sh` runs); without them the test fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use roomcast_integration::{ClusterOptions, Flavor, System, run};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);
const ROOM: &str = "example-backend";
const CLOSE_CODE: u16 = 4000;

/// `examples/node-backend` of this checkout: the repository root is the parent of this
/// crate's directory.
fn example_dir() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().unwrap_or(manifest_dir);
    root.join("examples").join("node-backend")
}

/// Fails (never skips) when the example cannot run here, saying what to install.
fn check_prerequisites(dir: &Path) {
    let node = std::process::Command::new("node").arg("--version").output();
    match node {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`node --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "this test runs examples/node-backend with Node, but `node` could not be started \
             ({e}); install Node 20 and run `npm ci --prefix examples/node-backend` \
             (scripts/test.sh does both)"
        ),
    }
    for package in ["@grpc/grpc-js", "@grpc/proto-loader"] {
        let path = dir.join("node_modules").join(package);
        assert!(
            path.is_dir(),
            "{} is missing: run `npm ci --prefix examples/node-backend` (scripts/test.sh does)",
            path.display()
        );
    }
}

/// The JSON line the example printed for `step`.
fn step<'a>(lines: &'a [Value], name: &str) -> Result<&'a Value> {
    lines
        .iter()
        .find(|line| line["step"] == name)
        .with_context(|| format!("the example printed no `{name}` line"))
}

async fn example_backend(sys: &mut System) -> Result<()> {
    let dir = example_dir();
    let mut bob = sys.client(1, "bob").await?;
    bob.join(ROOM).await?;

    let api = sys.server_api_url(0);
    let addr = api.strip_prefix("http://").unwrap_or(&api).to_owned();
    let mut node = tokio::process::Command::new("node");
    node.arg(dir.join("index.mjs"))
        .current_dir(&dir)
        .env("ROOMCAST_SERVER_API", &addr)
        .env("API_KEY", &sys.options().api_key)
        .env("ROOM", ROOM)
        .env("DISCONNECT_USER", "bob")
        .env("DISCONNECT_CODE", CLOSE_CODE.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), node.output())
        .await
        .context("the example did not finish within 20 s")?
        .context("starting node")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let printed = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    ensure!(
        out.status.success(),
        "the example exited with {}\n{printed}",
        out.status
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the example's stdout is not JSON lines\n{printed}"))?;

    let published = step(&lines, "publish")?;
    let offset = published["offset"].as_u64().context("publish offset")?;
    let again = step(&lines, "publish_again")?;
    ensure!(
        again["offset"] == published["offset"],
        "the repeated publish got another offset: {again} vs {published}"
    );

    let batch: Vec<u64> = step(&lines, "publish_batch")?["offsets"]
        .as_array()
        .context("publish_batch offsets")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    ensure!(
        batch == [offset + 1, offset + 2, offset + 3],
        "the batch should follow the publish in order: {batch:?} after {offset}"
    );

    let members = step(&lines, "presence")?["members"]
        .as_array()
        .context("presence members")?;
    ensure!(
        members
            .iter()
            .any(|m| m["user"] == "bob" && m["clientId"] == bob.client_id()),
        "the presence the example printed does not list bob ({}): {members:?}",
        bob.client_id()
    );

    let disconnect = step(&lines, "disconnect")?;
    ensure!(
        disconnect["code"] == CLOSE_CODE && disconnect["user"] == "bob",
        "{disconnect}"
    );
    let close = bob.expect_close(T).await?;
    ensure!(
        close.code == Some(CLOSE_CODE),
        "bob's connection should close with {CLOSE_CODE}, got {close}"
    );

    // Everything bob got before the close: the message once, despite the repeated publish.
    let frames = bob.drain(Duration::ZERO).await?;
    let messages: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "message" && f["room"] == ROOM)
        .collect();
    ensure!(
        messages.len() == 4,
        "bob should get the example's message exactly once and the batch's three, got {}: \
         {messages:?}",
        messages.len()
    );
    let message = messages[0];
    ensure!(
        message["offset"] == offset
            && message["user"] == "backend"
            && message["data"]["text"] == "hello from the backend",
        "unexpected message {message}"
    );
    for (n, message) in messages[1..].iter().enumerate() {
        let n = n as u64 + 1;
        ensure!(
            message["offset"] == offset + n && message["data"]["text"] == format!("batch {n}"),
            "batch message {n}: unexpected {message}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_example_backend_runs_against_a_cluster() {
    check_prerequisites(&example_dir());
    // Bob on gateway 1, the example on room-service 0: everything crosses the cluster.
    run(
        "example_backend",
        Flavor::Cluster,
        ClusterOptions::default(),
        example_backend,
    )
    .await;
}
