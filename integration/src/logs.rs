//! The per-system directory holding each process's log file. Removed when the system is
//! dropped after a passing test; kept (and its path printed) after a failure, or always with
//! `ROOMCAST_KEEP_LOGS=1`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};

#[derive(Debug)]
pub struct LogDir {
    path: PathBuf,
    keep: bool,
}

impl LogDir {
    /// A fresh directory under `$TMPDIR/roomcast-it/`, named after the test.
    pub fn for_test(name: &str) -> Result<Self> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let dir = std::env::temp_dir()
            .join("roomcast-it")
            .join(format!("{name}-{}-{millis}-{seq}", std::process::id()));
        let keep = std::env::var_os("ROOMCAST_KEEP_LOGS").is_some_and(|v| v != "0");
        Self::create(dir, keep)
    }

    /// A directory chosen by the user; never removed.
    pub fn at(path: impl Into<PathBuf>) -> Result<Self> {
        Self::create(path.into(), true)
    }

    fn create(path: PathBuf, keep: bool) -> Result<Self> {
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating log directory {}", path.display()))?;
        Ok(LogDir { path, keep })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory after the drop.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        if !self.keep && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
