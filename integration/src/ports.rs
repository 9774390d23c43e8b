//! Free TCP ports for the processes of a test system.
//!
//! The kernel hands out a free port when binding port 0; we read it and drop the listener so the
//! child can bind it. Another process could take it in between, but the kernel cycles through
//! its ephemeral range, so that is rare. What is not rare is the kernel handing the same port to
//! two tests running in parallel threads once the first listener is dropped, so the process keeps
//! every port it has handed out and never returns one twice.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, bail};

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A port on 127.0.0.1 that was free a moment ago and that this process has not handed out
/// before.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
        let port = listener
            .local_addr()
            .context("reading the bound address")?
            .port();
        drop(listener);
        // A poisoned lock only means another test panicked while holding it; the set is intact.
        let mut ports = handed_out().lock().unwrap_or_else(|e| e.into_inner());
        if ports.insert(port) {
            return Ok(port);
        }
    }
    bail!("no fresh free port after 100 attempts")
}

/// Marks `port` as handed out (a port a process will bind besides the one it was given, such
/// as a Redis Cluster node's bus port); false when it already was.
pub fn reserve(port: u16) -> bool {
    handed_out()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(port)
}

/// Where the processes of a system listen: fresh free ports (tests) or a fixed layout from a
/// base port (the `roomcast-cluster` command, so URLs stay the same between runs).
#[derive(Debug, Clone, Copy, Default)]
pub enum PortPlan {
    #[default]
    Free,
    /// `base + 0..9`: gateways; `base + 10`, `+ 11`: auth-service gRPC and metrics;
    /// `base + 20..29`: room-service gRPC; `base + 30..39`: room-service metrics;
    /// `base + 40`: redis-server.
    Base(u16),
}

/// The role a port is for, with the instance index where there are several.
#[derive(Debug, Clone, Copy)]
pub enum PortRole {
    Gateway(usize),
    AuthGrpc,
    AuthMetrics,
    RoomGrpc(usize),
    RoomMetrics(usize),
    Redis,
}

impl PortPlan {
    pub fn port(self, role: PortRole) -> Result<u16> {
        let base = match self {
            PortPlan::Free => return free_port(),
            PortPlan::Base(base) => base,
        };
        let offset = match role {
            PortRole::Gateway(i) if i < 10 => i,
            PortRole::AuthGrpc => 10,
            PortRole::AuthMetrics => 11,
            PortRole::RoomGrpc(i) if i < 10 => 20 + i,
            PortRole::RoomMetrics(i) if i < 10 => 30 + i,
            PortRole::Redis => 40,
            other => bail!("{other:?}: at most 10 instances fit the base-port layout"),
        };
        let offset = u16::try_from(offset).context("port offset")?;
        base.checked_add(offset)
            .with_context(|| format!("base port {base} + {offset} overflows"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_a_port_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn a_reserved_port_is_not_handed_out_again() {
        let given = free_port().unwrap();
        assert!(!reserve(given), "a port free_port gave is reserved already");
        let other = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if reserve(other) {
            assert!(!reserve(other));
        }
    }

    #[test]
    fn base_layout() {
        let plan = PortPlan::Base(7400);
        assert_eq!(plan.port(PortRole::Gateway(1)).unwrap(), 7401);
        assert_eq!(plan.port(PortRole::RoomMetrics(1)).unwrap(), 7431);
        assert_eq!(plan.port(PortRole::Redis).unwrap(), 7440);
        assert!(plan.port(PortRole::Gateway(10)).is_err());
    }
}
