//! `roomcast standalone`: the whole system in one process, in-memory store and broker.

use anyhow::Result;

use crate::cluster::ClusterOptions;
use crate::logs::LogDir;
use crate::ports::PortRole;
use crate::process::{ChildProcess, Spawn, binary};

#[derive(Debug)]
pub struct Standalone {
    opts: ClusterOptions,
    process: ChildProcess,
    http_url: String,
    /// The embedded room-service's gRPC server API.
    grpc_url: String,
    // Last: dropped after the process closed its log.
    log_dir: LogDir,
}

impl Standalone {
    /// Starts `roomcast standalone` and waits until it is ready; logs as for
    /// [`Cluster::start`](crate::Cluster::start).
    pub async fn start(opts: ClusterOptions) -> Result<Standalone> {
        Self::start_in(opts, LogDir::for_test("standalone")?).await
    }

    /// [`start`](Self::start) with the logs in `log_dir`.
    pub async fn start_in(opts: ClusterOptions, mut log_dir: LogDir) -> Result<Standalone> {
        match Self::spawn(&opts, &log_dir).await {
            Ok((process, http_url, grpc_url)) => Ok(Standalone {
                opts,
                process,
                http_url,
                grpc_url,
                log_dir,
            }),
            Err(e) => {
                log_dir.keep();
                Err(e.context(format!(
                    "starting roomcast standalone (logs kept in {})",
                    log_dir.path().display()
                )))
            }
        }
    }

    async fn spawn(
        opts: &ClusterOptions,
        log_dir: &LogDir,
    ) -> Result<(ChildProcess, String, String)> {
        let port = opts.ports.port(PortRole::Gateway(0))?;
        // The embedded room-service serves the server API; its default port would collide
        // between standalones running side by side.
        let grpc_port = opts.ports.port(PortRole::RoomGrpc(0))?;
        let spec = Spawn::new("standalone", binary("roomcast")?, log_dir.path())
            .arg("standalone")
            .env("JWT_SECRET", &opts.secret)
            .env("ROOM_SERVICE_ADDR", format!("127.0.0.1:{grpc_port}"))
            .env("API_KEY", &opts.api_key)
            .env("HISTORY_SIZE", opts.history_size)
            .env("HISTORY_TTL_SECONDS", opts.history_ttl_seconds);
        let spec = opts.gateway_spec(spec, &format!("127.0.0.1:{port}"));
        let process = ChildProcess::spawn(spec)?;
        let http_url = format!("http://127.0.0.1:{port}");
        process
            .wait_ready(&format!("{http_url}/readyz"), opts.ready_timeout)
            .await?;
        Ok((process, http_url, format!("http://127.0.0.1:{grpc_port}")))
    }

    pub fn options(&self) -> &ClusterOptions {
        &self.opts
    }

    pub fn process(&self) -> &ChildProcess {
        &self.process
    }

    pub fn log_dir(&self) -> &LogDir {
        &self.log_dir
    }

    pub fn log_dir_mut(&mut self) -> &mut LogDir {
        &mut self.log_dir
    }

    pub fn ws_url(&self) -> String {
        format!("{}/ws", self.http_url.replacen("http://", "ws://", 1))
    }

    pub fn http_url(&self) -> String {
        self.http_url.clone()
    }

    /// `http://127.0.0.1:P` of the embedded room-service (the server API).
    pub fn room_service_grpc(&self) -> String {
        self.grpc_url.clone()
    }
}
