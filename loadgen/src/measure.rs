//! CPU time of the processes under test, read at the edges of each `--steps` step: utime and
//! stime from /proc/PID/stat, and a Redis server's own CPU from `INFO cpu` (a Redis Cluster
//! shard is one server, so per-shard figures come the same way).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What to read, by label.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    pub pids: Vec<(String, Vec<u32>)>,
    pub redis: Vec<(String, SocketAddr)>,
    /// The load generator's own processes.
    pub own: Vec<u32>,
}

/// One reading: CPU seconds so far, per label.
#[derive(Debug, Clone, Default)]
pub struct Reading {
    /// (user + system, user)
    pub cpu: BTreeMap<String, (f64, f64)>,
    pub redis: BTreeMap<String, f64>,
    pub own: f64,
}

/// CPU seconds spent between two readings, per label.
#[derive(Debug, Clone, Default)]
pub struct Spent {
    pub cpu: BTreeMap<String, f64>,
    pub user: BTreeMap<String, f64>,
    pub redis: BTreeMap<String, f64>,
    pub own: f64,
}

impl Meter {
    pub async fn read(&self) -> Reading {
        let tck = clock_ticks();
        let mut r = Reading::default();
        for (label, pids) in &self.pids {
            let (mut total, mut user) = (0u64, 0u64);
            for &pid in pids {
                if let Some((u, s)) = proc_ticks(pid) {
                    total += u + s;
                    user += u;
                }
            }
            r.cpu
                .insert(label.clone(), (total as f64 / tck, user as f64 / tck));
        }
        for (label, addr) in &self.redis {
            if let Some(cpu) = redis_cpu(*addr).await {
                r.redis.insert(label.clone(), cpu);
            }
        }
        r.own = self
            .own
            .iter()
            .filter_map(|&p| proc_ticks(p))
            .map(|(u, s)| (u + s) as f64 / tck)
            .sum();
        r
    }
}

impl Spent {
    pub fn between(a: &Reading, b: &Reading) -> Spent {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        let mut s = Spent::default();
        for (label, &(total, user)) in &b.cpu {
            let (t0, u0) = a.cpu.get(label).copied().unwrap_or((total, user));
            s.cpu.insert(label.clone(), round(total - t0));
            s.user.insert(label.clone(), round(user - u0));
        }
        for (label, &cpu) in &b.redis {
            if let Some(&c0) = a.redis.get(label) {
                s.redis.insert(label.clone(), round(cpu - c0));
            }
        }
        s.own = round(b.own - a.own);
        s
    }
}

fn clock_ticks() -> f64 {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// (utime, stime) in clock ticks; `None` when the process is gone.
pub fn proc_ticks(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

fn parse_stat(stat: &str) -> Option<(u64, u64)> {
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// used_cpu_user + used_cpu_sys of the Redis at `addr`, in seconds.
async fn redis_cpu(addr: SocketAddr) -> Option<f64> {
    let ask = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"INFO cpu\r\n").await.ok()?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            if bulk_complete(&buf) {
                break;
            }
        }
        parse_info_cpu(std::str::from_utf8(&buf).ok()?)
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .ok()
        .flatten()
}

/// A RESP bulk string `$<len>\r\n<len bytes>\r\n` is all there.
fn bulk_complete(buf: &[u8]) -> bool {
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let len: usize = match std::str::from_utf8(&buf[1..nl])
        .ok()
        .and_then(|l| l.trim().parse().ok())
    {
        Some(l) => l,
        None => return true,
    };
    buf.len() >= nl + 1 + len + 2
}

fn parse_info_cpu(info: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let stat = "42 (tokio (rt) x) S 1 2 3 4 5 6 7 8 9 10 1234 567 0 0 20 0";
        assert_eq!(parse_stat(stat), Some((1234, 567)));
        let own = proc_ticks(std::process::id());
        assert!(own.is_some());
    }

    #[test]
    fn info_cpu() {
        let info = "$120\r\n# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\n\
                    used_cpu_sys_children:0.0\r\nused_cpu_user_children:0.0\r\n";
        assert_eq!(parse_info_cpu(info), Some(3.75));
        assert!(bulk_complete(b"$3\r\nabc\r\n"));
        assert!(!bulk_complete(b"$30\r\nabc"));
    }
}
