//! One interface over a cluster and a standalone gateway, so client-visible scenarios are
//! written once and run against both.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::client::TestClient;
use crate::cluster::{Cluster, ClusterOptions};
use crate::logs::LogDir;
use crate::process::ChildProcess;
use crate::standalone::Standalone;
use crate::token::{self, Claims};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Cluster,
    Standalone,
    /// A cluster whose scenario clients connect over SSE (stream on gateway `i`, commands
    /// posted to gateway `i + 1`).
    ClusterSse,
    /// Standalone with SSE clients.
    StandaloneSse,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Cluster => "cluster",
            Flavor::Standalone => "standalone",
            Flavor::ClusterSse => "cluster-sse",
            Flavor::StandaloneSse => "standalone-sse",
        }
    }
}

#[derive(Debug)]
pub enum System {
    Cluster(Cluster),
    Standalone(Standalone),
}

impl System {
    /// Starts a system with its logs in a fresh directory named after `test`.
    pub async fn start(flavor: Flavor, test: &str, mut opts: ClusterOptions) -> Result<System> {
        let log_dir = LogDir::for_test(&format!("{}-{test}", flavor.name()))?;
        opts.sse_clients |= matches!(flavor, Flavor::ClusterSse | Flavor::StandaloneSse);
        Ok(match flavor {
            Flavor::Cluster | Flavor::ClusterSse => {
                System::Cluster(Cluster::start_in(opts, log_dir).await?)
            }
            Flavor::Standalone | Flavor::StandaloneSse => {
                System::Standalone(Standalone::start_in(opts, log_dir).await?)
            }
        })
    }

    /// Cluster or standalone (whatever the clients' transport).
    pub fn flavor(&self) -> Flavor {
        match self {
            System::Cluster(_) => Flavor::Cluster,
            System::Standalone(_) => Flavor::Standalone,
        }
    }

    pub fn options(&self) -> &ClusterOptions {
        match self {
            System::Cluster(c) => c.options(),
            System::Standalone(s) => s.options(),
        }
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        match self {
            System::Cluster(c) => Some(c),
            System::Standalone(_) => None,
        }
    }

    pub fn cluster_mut(&mut self) -> Option<&mut Cluster> {
        match self {
            System::Cluster(c) => Some(c),
            System::Standalone(_) => None,
        }
    }

    /// How many gateways clients can connect to (1 for standalone).
    pub fn gateways(&self) -> usize {
        match self {
            System::Cluster(c) => c.gateway_count(),
            System::Standalone(_) => 1,
        }
    }

    /// WebSocket URL of gateway `i`, taken modulo the gateway count so a scenario that spreads
    /// clients over gateways also runs on a single one.
    pub fn ws_url(&self, i: usize) -> String {
        match self {
            System::Cluster(c) => c.ws_url(i % c.gateway_count()),
            System::Standalone(s) => s.ws_url(),
        }
    }

    pub fn http_url(&self, i: usize) -> String {
        match self {
            System::Cluster(c) => c.http_url(i % c.gateway_count()),
            System::Standalone(s) => s.http_url(),
        }
    }

    /// The gRPC server API (`http://127.0.0.1:P`) of room-service `i` (modulo the count; the
    /// standalone has one, embedded).
    pub fn server_api_url(&self, i: usize) -> String {
        match self {
            System::Cluster(c) => c.room_service_grpc(i % c.room_service_count().max(1)),
            System::Standalone(s) => s.room_service_grpc(),
        }
    }

    pub fn secret(&self) -> &str {
        &self.options().secret
    }

    /// A valid token for `sub`, every room allowed.
    pub fn token(&self, sub: &str) -> Result<String> {
        token::mint(self.secret(), &Claims::new(sub))
    }

    pub fn mint(&self, claims: &Claims) -> Result<String> {
        token::mint(self.secret(), claims)
    }

    /// Connects `sub` to gateway `gateway` and reads the `connected` frame.
    pub async fn client(&self, gateway: usize, sub: &str) -> Result<TestClient> {
        self.client_with(gateway, &Claims::new(sub)).await
    }

    pub async fn client_with(&self, gateway: usize, claims: &Claims) -> Result<TestClient> {
        if self.options().sse_clients {
            let (stream, post) = (self.http_url(gateway), self.http_url(gateway + 1));
            return TestClient::connect_sse(&stream, &post, &self.mint(claims)?)
                .await
                .with_context(|| format!("connecting {} to {stream} over SSE", claims.sub));
        }
        let url = self.ws_url(gateway);
        TestClient::connect(&url, &self.mint(claims)?)
            .await
            .with_context(|| format!("connecting {} to {url}", claims.sub))
    }

    pub fn processes(&self) -> Vec<&ChildProcess> {
        match self {
            System::Cluster(c) => c.processes(),
            System::Standalone(s) => vec![s.process()],
        }
    }

    pub fn log_dir(&self) -> &LogDir {
        match self {
            System::Cluster(c) => c.log_dir(),
            System::Standalone(s) => s.log_dir(),
        }
    }

    /// Keeps the logs and describes where they are, with the end of each.
    pub fn keep_logs_and_report(&mut self, tail_lines: usize) -> String {
        match self {
            System::Cluster(c) => c.log_dir_mut().keep(),
            System::Standalone(s) => s.log_dir_mut().keep(),
        }
        let mut out = format!("logs kept in {}\n", self.log_dir().path().display());
        for p in self.processes() {
            let state = if p.is_running() { "running" } else { "exited" };
            let _ = writeln!(
                out,
                "---- {} (pid {}, {state}) {} ----\n{}",
                p.name(),
                p.pid(),
                p.log_path().display(),
                p.log_tail(tail_lines)
            );
        }
        out
    }
}

/// Limits for one test.
pub const STARTUP_LIMIT: Duration = Duration::from_secs(30);
pub const BODY_LIMIT: Duration = Duration::from_secs(30);

/// Starts a system, runs `scenario` on it within [`BODY_LIMIT`], and panics with the logs on
/// failure. Every process is killed when this returns or unwinds.
pub async fn run(
    test: &str,
    flavor: Flavor,
    opts: ClusterOptions,
    scenario: impl AsyncFnOnce(&mut System) -> Result<()>,
) {
    let started = tokio::time::timeout(STARTUP_LIMIT, System::start(flavor, test, opts)).await;
    let mut system = match started {
        Ok(Ok(system)) => system,
        Ok(Err(e)) => panic!("{test} ({}): start failed: {e:#}", flavor.name()),
        Err(_) => panic!(
            "{test} ({}): start took over {STARTUP_LIMIT:?}",
            flavor.name()
        ),
    };
    let outcome = tokio::time::timeout(BODY_LIMIT, scenario(&mut system)).await;
    let failure = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => format!("did not finish within {BODY_LIMIT:?}"),
    };
    let report = system.keep_logs_and_report(40);
    panic!("{test} ({}) failed: {failure}\n{report}", flavor.name());
}
