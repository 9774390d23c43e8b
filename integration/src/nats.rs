//! A private `nats-server` for one test system, for runs with `BROKER_URL=nats://…`: its own
//! port, killed on drop. Never the shared one on 4222.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::ports::free_port;
use crate::process::{ChildProcess, Spawn};

const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct NatsServer {
    _process: ChildProcess,
    port: u16,
}

/// `nats-server` from PATH, or where Debian's package puts it.
fn program() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    on_path
        .or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file()))
        .context("nats-server not found (Debian package nats-server; scripts/test.sh installs it)")
}

impl NatsServer {
    pub async fn start(log_dir: &Path) -> Result<Self> {
        let port = free_port()?;
        let spec = Spawn::new("nats", program()?, log_dir)
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.to_string());
        let process = ChildProcess::spawn(spec)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The server greets every client with an INFO line.
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await {
                let mut greeting = [0u8; 4];
                if stream.read_exact(&mut greeting).await.is_ok() && &greeting == b"INFO" {
                    break;
                }
            }
            if Instant::now() >= deadline {
                bail!("nats-server on port {port} did not greet within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(NatsServer {
            _process: process,
            port,
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}
