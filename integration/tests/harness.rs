//! Checks of the harness itself that need no Roomcast binary: a private redis-server, and child
//! processes that die or never become ready.

use std::time::Duration;

use roomcast_integration::logs::LogDir;
use roomcast_integration::process::{ChildProcess, Spawn};
use roomcast_integration::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn ping(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"PING\r\n").await?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn redis_starts_restarts_and_dies_with_its_handle() {
    let dir = LogDir::for_test("harness-redis").unwrap();
    let mut redis = RedisServer::start(dir.path()).await.unwrap();
    assert_ne!(redis.port(), 6379);
    assert_eq!(ping(redis.port()).await.unwrap(), "+PONG\r\n");
    let first_pid = redis.process().pid();
    redis.restart_empty().await.unwrap();
    assert!(
        !pid_alive(first_pid),
        "the first redis-server is still running"
    );
    assert_eq!(ping(redis.port()).await.unwrap(), "+PONG\r\n");
    let (pid, port) = (redis.process().pid(), redis.port());
    drop(redis);
    assert!(!pid_alive(pid), "redis-server survived its handle");
    assert!(ping(port).await.is_err());
}

#[tokio::test]
async fn wait_ready_fails_fast_when_the_process_exits() {
    let dir = LogDir::for_test("harness-exit").unwrap();
    let spec = Spawn::new("shell", "sh", dir.path())
        .arg("-c")
        .arg("echo starting; echo \"secret=$JWT_SECRET\"; exit 3")
        .env("JWT_SECRET", "s3");
    let p = ChildProcess::spawn(spec).unwrap();
    let started = std::time::Instant::now();
    let err = p
        .wait_ready("http://127.0.0.1:1/readyz", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let msg = format!("{err:#}");
    assert!(msg.contains("exited") && msg.contains("secret=s3"), "{msg}");
}

#[tokio::test]
async fn children_get_only_the_harness_environment() {
    let dir = LogDir::for_test("harness-env").unwrap();
    let spec = Spawn::new("env", "sh", dir.path())
        .arg("-c")
        .arg("env")
        .env("ROOMCAST_X", "1");
    let p = ChildProcess::spawn(spec).unwrap();
    p.wait_exit(Duration::from_secs(5)).await.unwrap();
    let env = std::fs::read_to_string(p.log_path()).unwrap();
    assert!(
        env.contains("ROOMCAST_X=1") && env.contains("RUST_LOG=info"),
        "{env}"
    );
    for line in env.lines() {
        let key = line.split('=').next().unwrap_or_default();
        assert!(
            [
                "ROOMCAST_X",
                "RUST_LOG",
                "PATH",
                "HOME",
                "TMPDIR",
                "LANG",
                "RUST_BACKTRACE",
                "PWD",
                "SHLVL",
                "_"
            ]
            .contains(&key),
            "unexpected variable {line}"
        );
    }
}

#[tokio::test]
async fn terminate_and_kill() {
    let dir = LogDir::for_test("harness-signals").unwrap();
    let p = ChildProcess::spawn(Spawn::new("sleep", "sleep", dir.path()).arg("30")).unwrap();
    assert!(p.is_running());
    p.terminate().unwrap();
    assert!(p.wait_exit(Duration::from_secs(5)).await.unwrap().is_some());
    let q = ChildProcess::spawn(Spawn::new("sleep2", "sleep", dir.path()).arg("30")).unwrap();
    q.kill9().unwrap();
    assert!(!q.is_running());
}
