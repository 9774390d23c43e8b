//! A private Redis Cluster for one test: 3 masters and 3 replicas of `redis-server
//! --cluster-enabled yes` on free ports (each with its cluster bus on port + 10000), made with
//! `redis-cli --cluster create`, killed on drop. Never the Redis on 6379.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::ports::{free_port, reserve};
use crate::process::{ChildProcess, Spawn};

/// How long the cluster gets to form, and a failover to complete.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<(u16, ChildProcess)>,
    log_dir: PathBuf,
}

/// A port whose cluster bus port (+ 10000) is free too. The bus port is reserved as well, so
/// that no other node or process of this test run is handed it before its node binds it.
fn cluster_port() -> Result<u16> {
    for _ in 0..200 {
        let port = free_port()?;
        if port > 55_000 || !reserve(port + 10_000) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port with a free cluster bus port after 200 attempts")
}

/// `redis-cli -p port args…`, its output.
pub fn cli(port: u16, args: &[&str]) -> Result<String> {
    let output = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .context("running redis-cli (is the redis-tools package installed?)")?;
    ensure!(
        output.status.success(),
        "redis-cli -p {port} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// How many times `command` ran, from `INFO commandstats` output (0 when it never did).
pub fn command_calls(stats: &str, command: &str) -> u64 {
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each and waits until every node
    /// says the cluster is ok.
    pub async fn start(log_dir: &Path, masters: usize, replicas: usize) -> Result<Self> {
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let port = cluster_port()?;
            let spec = Spawn::new(format!("redis-{port}"), "redis-server", log_dir)
                .arg("--port")
                .arg(port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--cluster-enabled")
                .arg("yes")
                .arg("--cluster-config-file")
                .arg(format!("nodes-{port}.conf"))
                // A dead master is replaced within a few seconds.
                .arg("--cluster-node-timeout")
                .arg("1000")
                // The other shards keep serving while one fails over.
                .arg("--cluster-require-full-coverage")
                .arg("no")
                // Replicas are in sync moments after the cluster forms (a replica that never
                // synced is not allowed to take over).
                .arg("--repl-diskless-sync-delay")
                .arg("0")
                .arg("--save")
                .arg("")
                .arg("--appendonly")
                .arg("no")
                .arg("--dir")
                .arg(log_dir.display().to_string());
            let process = ChildProcess::spawn(spec).context("starting redis-server")?;
            nodes.push((port, process));
        }
        let cluster = RedisCluster {
            nodes,
            log_dir: log_dir.to_path_buf(),
        };
        for (port, _) in &cluster.nodes {
            cluster.wait(|| Ok(cli(*port, &["PING"])?.trim() == "PONG"), "PING")?;
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        let replicas = replicas.to_string();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        cli(cluster.nodes[0].0, &create)?;
        for (port, _) in &cluster.nodes {
            cluster.wait(|| cluster_ok(*port), "cluster_state:ok")?;
        }
        for (port, _) in &cluster.nodes {
            cluster.wait(|| replica_synced(*port), "replicas in sync")?;
        }
        Ok(cluster)
    }

    fn wait(&self, mut check: impl FnMut() -> Result<bool>, what: &str) -> Result<()> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            if check().unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let nodes = self
                    .alive_port()
                    .and_then(|port| cli(port, &["CLUSTER", "NODES"]))
                    .unwrap_or_else(|e| e.to_string());
                bail!(
                    "redis cluster: no {what} within {FORM_TIMEOUT:?} (logs in {}); nodes:\n{nodes}",
                    self.log_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://127.0.0.1:P,…` naming every node.
    pub fn url(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        format!("redis+cluster://{}", nodes.join(","))
    }

    /// Every node's process.
    pub fn processes(&self) -> impl Iterator<Item = &ChildProcess> {
        self.nodes.iter().map(|(_, process)| process)
    }

    /// The ports of the nodes alive now that serve slots as masters.
    pub fn masters(&self) -> Result<Vec<u16>> {
        let alive = self.alive_port()?;
        let nodes = cli(alive, &["CLUSTER", "NODES"])?;
        let mut masters: Vec<u16> = nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter(|l| l.split_whitespace().count() > 8)
            .filter_map(|l| {
                let address = l.split_whitespace().nth(1)?;
                address.split(['@', ':']).nth(1)?.parse().ok()
            })
            .collect();
        masters.sort_unstable();
        Ok(masters)
    }

    /// The port of the master serving `key`'s slot (a channel name, for sharded pub/sub).
    pub fn master_of(&self, key: &str) -> Result<u16> {
        let alive = self.alive_port()?;
        let slot: u16 = cli(alive, &["CLUSTER", "KEYSLOT", key])?.trim().parse()?;
        // CLUSTER NODES: `id addr flags master ping pong epoch state slot-ranges…`.
        let nodes = cli(alive, &["CLUSTER", "NODES"])?;
        for line in nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let serves = fields.iter().skip(8).any(|range| {
                let mut bounds = range.split('-');
                let low = bounds.next().and_then(|b| b.parse::<u16>().ok());
                let high = bounds.next().and_then(|b| b.parse::<u16>().ok()).or(low);
                matches!((low, high), (Some(l), Some(h)) if l <= slot && slot <= h)
            });
            if serves {
                let port = fields[1].split(['@', ':']).nth(1).context("node address")?;
                return Ok(port.parse()?);
            }
        }
        bail!("no live master serves slot {slot}")
    }

    /// Kills the node on `port` (kill -9) and waits until one of its replicas serves its slots
    /// and the cluster is ok again.
    pub fn kill_master(&self, port: u16) -> Result<()> {
        let (_, process) = self
            .nodes
            .iter()
            .find(|(p, _)| *p == port)
            .context("no such node")?;
        process.kill9()?;
        self.wait(
            || Ok(!self.masters()?.contains(&port) && self.masters()?.len() == 3),
            "replica promoted",
        )?;
        let alive = self.alive_port()?;
        self.wait(|| cluster_ok(alive), "cluster_state:ok after the failover")
    }

    /// A manual failover of the master on `port` (`CLUSTER FAILOVER` on one of its replicas:
    /// the master stops taking writes, the replica catches up with it and takes its slots, so
    /// no acknowledged write is lost); waits until the replica serves them and the cluster is
    /// ok.
    pub fn failover(&self, port: u16) -> Result<()> {
        let alive = self.alive_port()?;
        let nodes = cli(alive, &["CLUSTER", "NODES"])?;
        // `id addr flags master-id …`
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let node_port = |fields: &[&str]| -> Option<u16> {
            fields.get(1)?.split(['@', ':']).nth(1)?.parse().ok()
        };
        let master_id = lines
            .iter()
            .find(|f| node_port(f) == Some(port))
            .and_then(|f| f.first().copied())
            .context("no such node")?;
        let replica = lines
            .iter()
            .find(|f| f.get(3) == Some(&master_id) && !f[2].contains("fail"))
            .and_then(|f| node_port(f))
            .context("the master has no live replica")?;
        cli(replica, &["CLUSTER", "FAILOVER"])?;
        self.wait(
            || {
                let masters = self.masters()?;
                Ok(masters.contains(&replica) && !masters.contains(&port))
            },
            "manual failover",
        )?;
        self.wait(|| cluster_ok(alive), "cluster_state:ok after the failover")
    }

    /// The CPU time (user + system, seconds) each live master has used so far.
    pub fn master_cpu(&self) -> Result<Vec<(u16, f64)>> {
        let mut out = Vec::new();
        for port in self.masters()? {
            let info = cli(port, &["INFO", "cpu"])?;
            let field = |name: &str| -> f64 {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0.0)
            };
            out.push((port, field("used_cpu_user:") + field("used_cpu_sys:")));
        }
        Ok(out)
    }

    fn alive_port(&self) -> Result<u16> {
        self.nodes
            .iter()
            .find(|(_, p)| p.is_running())
            .map(|(port, _)| *port)
            .context("no redis node is running")
    }
}

/// A master, or a replica whose link to its master is up.
fn replica_synced(port: u16) -> Result<bool> {
    let info = cli(port, &["INFO", "replication"])?;
    Ok(info.contains("role:master") || info.contains("master_link_status:up"))
}

fn cluster_ok(port: u16) -> Result<bool> {
    Ok(cli(port, &["CLUSTER", "INFO"])?.contains("cluster_state:ok"))
}
