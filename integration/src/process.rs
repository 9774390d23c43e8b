//! Child processes of a test system: spawned with a controlled environment and a log file,
//! signalled on demand, and always SIGKILLed on drop so a failing test leaves nothing running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::http;

/// Environment variables a child inherits from us; everything else (a developer's `REDIS_URL`
/// pointing at the shared Redis, say) is cleared so only what the harness sets applies. Not
/// `RUST_BACKTRACE` either: a start-up error's backtrace would push the error itself out of the
/// log tail a failing test prints.
const INHERITED_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG"];

/// The directory holding the workspace binaries: `ROOMCAST_BIN_DIR`, else the directory of the
/// running executable (`target/debug/deps` for a test, whose parent is `target/debug`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ROOMCAST_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of workspace binary `name`, which must exist.
pub fn binary(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "binary {} not found: run `cargo build --workspace` first, or set ROOMCAST_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spawn {
    /// Short name for messages and the log file (`gateway-0`).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// stdout and stderr both go here.
    pub log: PathBuf,
}

impl Spawn {
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>, log_dir: &Path) -> Self {
        let name = name.into();
        let log = log_dir.join(format!("{name}.log"));
        Spawn {
            name,
            program: program.into(),
            args: Vec::new(),
            env: vec![("RUST_LOG".into(), "info".into())],
            log,
        }
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.to_string()));
        self
    }
}

/// A running child. Methods take `&self` so tests can kill one process of a shared system.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    pid: u32,
    log: PathBuf,
    child: Mutex<Child>,
}

impl ChildProcess {
    pub fn spawn(spec: Spawn) -> Result<Self> {
        let log = File::create(&spec.log)
            .with_context(|| format!("creating log file {}", spec.log.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let mut command = Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for key in INHERITED_ENV {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command.envs(spec.env.iter().map(|(k, v)| (k, v)));
        let child = command
            .spawn()
            .with_context(|| format!("spawning {} ({})", spec.name, spec.program.display()))?;
        Ok(ChildProcess {
            name: spec.name,
            pid: child.id(),
            log: spec.log,
            child: Mutex::new(child),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        // Poisoned only if a panic happened mid-call; the Child itself is still usable.
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exit status if the process has ended.
    pub fn exit_status(&self) -> Result<Option<ExitStatus>> {
        self.child()
            .try_wait()
            .with_context(|| format!("checking whether {} exited", self.name))
    }

    pub fn is_running(&self) -> bool {
        matches!(self.exit_status(), Ok(None))
    }

    /// SIGKILL, then reap. The process gets no chance to clean up: a crash.
    pub fn kill9(&self) -> Result<()> {
        let mut child = self.child();
        if child.try_wait().ok().flatten().is_some() {
            return Ok(());
        }
        child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        child
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        Ok(())
    }

    /// SIGTERM: asks for a graceful shutdown (a gateway drains). Does not wait.
    pub fn terminate(&self) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        let pid = i32::try_from(self.pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to {}", self.name))
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub async fn stop(&self, grace: Duration) -> Result<()> {
        self.terminate()?;
        if self.wait_exit(grace).await?.is_none() {
            self.kill9()?;
        }
        Ok(())
    }

    /// Polls `url` until it answers 200. Fails early, with the end of the log, when the process
    /// exits.
    pub async fn wait_ready(&self, url: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                bail!(
                    "{} exited ({status}) before {url} was ready; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(30)
                );
            }
            let last = match http::get(url, Duration::from_secs(1)).await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => format!("HTTP {} {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready at {url} within {timeout:?} (last: {last}); log {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of the log file.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `lines` lines of a file, or why it could not be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
