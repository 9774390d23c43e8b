//! A private `redis-server` for one test system: its own port, no persistence, killed on drop.
//! Never the shared Redis on 6379. With TLS ([`RedisServer::start_tls_on`]) the port speaks
//! only TLS (the test certificate for `localhost`), and the URL is `rediss://localhost:P`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ports::free_port;
use crate::process::{ChildProcess, Spawn};

/// How long redis-server gets to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct RedisServer {
    process: ChildProcess,
    port: u16,
    log_dir: PathBuf,
    /// How many times this server was started; names the log file of each run.
    starts: u32,
    /// Serving TLS only.
    tls: bool,
}

impl RedisServer {
    /// Starts on a free port, logging into `log_dir/redis.log`.
    pub async fn start(log_dir: &Path) -> Result<Self> {
        Self::start_on(free_port()?, log_dir).await
    }

    pub async fn start_on(port: u16, log_dir: &Path) -> Result<Self> {
        Self::start_with(port, log_dir, false).await
    }

    /// Serves TLS only on `port`, with the test certificate (`testdata/tls`); clients are not
    /// asked for certificates.
    pub async fn start_tls_on(port: u16, log_dir: &Path) -> Result<Self> {
        Self::start_with(port, log_dir, true).await
    }

    async fn start_with(port: u16, log_dir: &Path, tls: bool) -> Result<Self> {
        let process = spawn(port, log_dir, 1, tls)?;
        let server = RedisServer {
            process,
            port,
            log_dir: log_dir.to_path_buf(),
            starts: 1,
            tls,
        };
        server.wait_pong().await?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `redis://127.0.0.1:P`, or `rediss://localhost:P` (the certificate's name) with TLS.
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://localhost:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    pub fn process(&self) -> &ChildProcess {
        &self.process
    }

    /// Kills the server and starts an empty one on the same port: the store lost everything.
    pub async fn restart_empty(&mut self) -> Result<()> {
        self.process.kill9()?;
        self.starts += 1;
        self.process = spawn(self.port, &self.log_dir, self.starts, self.tls)?;
        self.wait_pong().await
    }

    async fn wait_pong(&self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.process.exit_status()? {
                bail!(
                    "redis-server on port {} exited ({status}); log:\n{}",
                    self.port,
                    self.process.log_tail(20)
                );
            }
            if ping(self.port, self.tls).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.process.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spawn(port: u16, log_dir: &Path, start: u32, tls: bool) -> Result<ChildProcess> {
    // A restart logs to a new file rather than truncating the first run's log.
    let name = if start == 1 {
        "redis".to_owned()
    } else {
        format!("redis-{start}")
    };
    let mut spec = Spawn::new(name, "redis-server", log_dir);
    spec = if tls {
        spec.arg("--port")
            .arg("0")
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(crate::tls::path("server.pem"))
            .arg("--tls-key-file")
            .arg(crate::tls::path("server.key.pem"))
            .arg("--tls-ca-cert-file")
            .arg(crate::tls::path("ca.pem"))
            .arg("--tls-auth-clients")
            .arg("no")
    } else {
        spec.arg("--port").arg(port.to_string())
    };
    let spec = spec
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--dir")
        .arg(log_dir.display().to_string());
    ChildProcess::spawn(spec)
        .context("starting redis-server (is the redis-server package installed?)")
}

/// One raw `PING` → `+PONG` (over TLS, verifying `localhost` against the test CA, with `tls`).
async fn ping(port: u16, tls: bool) -> Result<()> {
    if tls {
        let stream = crate::tls::connect("localhost", port).await?;
        return ping_on(stream).await;
    }
    ping_on(TcpStream::connect(("127.0.0.1", port)).await?).await
}

async fn ping_on(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> Result<()> {
    stream.write_all(b"PING\r\n").await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf))
        .await
        .context("PING timed out")??;
    if buf[..n].starts_with(b"+PONG") {
        Ok(())
    } else {
        bail!(
            "unexpected PING answer {:?}",
            String::from_utf8_lossy(&buf[..n])
        )
    }
}
