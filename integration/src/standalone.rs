//! `gateway standalone`: the whole system in one process, in-memory store and broker.

use anyhow::{Context, Result};

use crate::cluster::ClusterOptions;
use crate::logs::LogDir;
use crate::ports::PortRole;
use crate::process::{ChildProcess, Spawn, binary};

#[derive(Debug)]
pub struct Standalone {
    opts: ClusterOptions,
    process: ChildProcess,
    http_url: String,
    // Last: dropped after the process closed its log.
    log_dir: LogDir,
}

impl Standalone {
    pub async fn start(opts: ClusterOptions, log_dir: LogDir) -> Result<Standalone> {
        let port = opts.ports.port(PortRole::Gateway(0))?;
        let spec = Spawn::new("standalone", binary("gateway")?, log_dir.path())
            .arg("standalone")
            .env("JWT_SECRET", &opts.secret);
        let spec = opts.gateway_spec(spec, &format!("127.0.0.1:{port}"));
        let process = ChildProcess::spawn(spec)?;
        let http_url = format!("http://127.0.0.1:{port}");
        process
            .wait_ready(&format!("{http_url}/readyz"), opts.ready_timeout)
            .await
            .with_context(|| {
                format!(
                    "starting gateway standalone (logs in {})",
                    log_dir.path().display()
                )
            })?;
        Ok(Standalone {
            opts,
            process,
            http_url,
            log_dir,
        })
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
}
