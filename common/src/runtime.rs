//! The async runtime of every service binary, sized by `WORKER_THREADS`.
//!
//! Unset or 0: one worker per CPU this process may use (tokio's default, which follows cgroup
//! CPU quotas); N: N workers. Where several Roomcast processes share few cores (a laptop, a
//! small VM, a cluster on one machine) fewer workers than cores is cheaper: a worker that runs
//! out of tasks parks and is woken again, and each of those thread switches costs CPU. On two
//! cores with two gateways and two room-services, one worker each cut the CPU per delivery by
//! about a fifth (1000 subscribers x 200 msg/s, `loadgen fanout`, by hand: 5.8 -> 5.0 us).
//! A current-thread runtime was measured too: the same CPU, a worse p99, so one worker is
//! still a multi-thread runtime.

use std::io;

use thiserror::Error;
use tokio::runtime::{Builder, Runtime};

/// The setting's name.
pub const WORKER_THREADS: &str = "WORKER_THREADS";

#[derive(Debug, Error)]
pub enum RuntimeError {
    #[error("{WORKER_THREADS} must be a number of threads (0: one per CPU), got {0:?}")]
    Setting(String),
    #[error("could not start the runtime: {0}")]
    Start(#[from] io::Error),
}

/// Worker threads asked for by `value` (the setting's text): `None` means one per CPU.
pub fn workers(value: Option<&str>) -> Result<Option<usize>, RuntimeError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => match text.parse::<usize>() {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(RuntimeError::Setting(text.to_string())),
        },
    }
}

/// The runtime `WORKER_THREADS` asks for.
pub fn build() -> Result<Runtime, RuntimeError> {
    let setting = std::env::var(WORKER_THREADS).ok();
    let mut builder = Builder::new_multi_thread();
    if let Some(n) = workers(setting.as_deref())? {
        builder.worker_threads(n);
    }
    Ok(builder.enable_all().build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_values() {
        assert_eq!(workers(None).unwrap(), None);
        assert_eq!(workers(Some("")).unwrap(), None);
        assert_eq!(workers(Some("0")).unwrap(), None);
        assert_eq!(workers(Some("1")).unwrap(), Some(1));
        assert_eq!(workers(Some(" 4 ")).unwrap(), Some(4));
        for bad in ["-1", "two", "1.5"] {
            let error = workers(Some(bad)).unwrap_err();
            assert!(error.to_string().contains(WORKER_THREADS), "{error}");
        }
    }
}
