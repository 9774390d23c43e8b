//! Command line: one subcommand per scenario, each with the common options flattened in, so
//! `loadgen fanout --url … --duration 5s` reads naturally. Values are validated here, so a bad
//! argument gets clap's usual message and exit status 2 before anything connects.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_tungstenite::tungstenite::http::Uri;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for Roomcast gateways",
    long_about = "Load generator for Roomcast gateways. Drives a running Roomcast (standalone or \
                  cluster) over loopback, prints a human summary and then one JSON object on \
                  stdout (only the JSON object with --json)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Open N idle connections, hold them, report connect rate, failures and gateway RSS.
    Connections(ConnectionsArgs),
    /// S subscribers in R rooms, WebSocket publishers at a given rate: delivery and latency.
    Fanout(FanoutArgs),
    /// Publish through the room-service gRPC server API to R rooms of S WebSocket subscribers.
    PublishApi(PublishApiArgs),
}

impl Scenario {
    pub fn common(&self) -> &CommonArgs {
        match self {
            Scenario::Connections(a) => &a.common,
            Scenario::Fanout(a) => &a.common,
            Scenario::PublishApi(a) => &a.common,
        }
    }
}

/// Options every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Gateway WebSocket URL; repeat the option or separate with commas to spread connections
    /// round-robin over several gateways. Loopback addresses only (the client sockets are bound
    /// to 127.0.0.x source addresses).
    #[arg(
        long = "url",
        value_name = "URL",
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws",
        value_parser = parse_ws_url
    )]
    pub urls: Vec<WsUrl>,
    /// HS256 secret used to mint one token per connection (sub = load-<n>).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// One ready-made token used by every connection, instead of minting (wins over --secret).
    #[arg(long, env = "LOADGEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// connections: upper bound on the whole run (ramp + hold); fanout and publish-api: how
    /// long to publish (default 10s). Accepts 500ms, 10s, 2m or plain seconds.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print only the final JSON object (and no progress bar).
    #[arg(long)]
    pub json: bool,
    /// Bind client sockets to 127.0.0.1 ..= 127.0.0.N, round-robin, so the ephemeral port
    /// range (about 28k ports per source address) is no limit.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub source_ips: u8,
    /// Give up on one connection (TCP + upgrade + `connected` frame) after this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Handshakes in flight at once, at most, over all workers. Keep it under the gateways'
    /// listen backlog (often 128): past it the kernel drops SYNs, and each retry costs 1 s.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Number of connections to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// New connections per second (0: as fast as --concurrency allows).
    #[arg(long, default_value_t = 1000.0, value_parser = parse_rate_or_zero)]
    pub rate: f64,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Worker processes: `auto` (one per 15000 connections) or a number.
    #[arg(long, default_value = "auto", value_parser = parse_workers)]
    pub workers: Workers,
    /// PID of a gateway whose RSS (VmRSS) is sampled before the ramp and after the hold;
    /// repeatable.
    #[arg(long = "gateway-pid", value_name = "PID")]
    pub gateway_pids: Vec<u32>,
    /// Internal: run as worker process of a multi-process run (first connection number).
    #[arg(long, hide = true)]
    pub worker_first: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Auto,
    Fixed(u32),
}

/// Subscribers and rooms, shared by fanout and publish-api.
#[derive(Debug, Clone, Args)]
pub struct RoomArgs {
    /// WebSocket subscribers, spread round-robin over the rooms.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub subscribers: u32,
    /// Rooms.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rooms: u32,
    /// Total publish rate, messages per second over all publishers.
    #[arg(long, default_value_t = 100.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Size of the filler string in each message's data.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// After publishing stops, wait at most this long for outstanding replies and deliveries
    /// (ends early once every expected delivery arrived).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Subscriber connections opened per second during set-up (0: as fast as --concurrency
    /// allows).
    #[arg(long, default_value_t = 2000.0, value_parser = parse_rate_or_zero)]
    pub connect_rate: f64,
    /// Room names are <prefix>-<random run id>-<n>, fresh for every run.
    #[arg(long, default_value = "loadgen", value_parser = parse_room_prefix)]
    pub room_prefix: String,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub rooms: RoomArgs,
    /// Publisher connections (each joins its room, round-robin); default one per room.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub publishers: Option<u32>,
    /// The server's protocol: `roomcast`, or `socketio` for the Socket.IO reference of
    /// bench/socketio (Engine.IO 4 over WebSocket; give its URL as ws://HOST:PORT/socket.io/).
    #[arg(long, value_enum, default_value_t = Protocol::Roomcast)]
    pub protocol: Protocol,
    /// Which gateway a member connects to: `spread` (connection n to URL n mod U, so a room's
    /// members are spread over the gateways) or `room` (every member of room r to URL r mod U).
    #[arg(long, value_enum, default_value_t = Placement::Spread)]
    pub placement: Placement,
    /// Worker processes: `auto` (one per 15000 members, whole rooms each) or a number.
    #[arg(long, default_value = "auto", value_parser = parse_workers)]
    pub workers: Workers,
    #[command(flatten)]
    pub steps: StepArgs,
    /// Internal: run as worker process of a multi-process run (rooms FIRST:END, run id).
    #[arg(long, hide = true, value_parser = parse_room_range)]
    pub worker_rooms: Option<(u32, u32)>,
    #[arg(long, hide = true)]
    pub run_id: Option<String>,
}

/// A rising-rate run: one set-up, then publishing steps at increasing total rates.
#[derive(Debug, Clone, Args)]
pub struct StepArgs {
    /// Publish at each of these total rates in turn (comma-separated, msg/s), one set-up for
    /// all; stops after the first step that fails (any loss, unanswered or refused publish,
    /// member dropped, or p99 above --max-p99). Replaces --rate and --duration.
    #[arg(long, value_delimiter = ',', value_parser = parse_rate, conflicts_with_all = ["duration", "rate"])]
    pub steps: Vec<f64>,
    /// How long to publish at each step.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub step_duration: Duration,
    /// Pause between steps (after the drain), so the servers are idle when a step starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub step_pause: Duration,
    /// A step fails above this publish-to-delivery p99 (ms).
    #[arg(long, default_value_t = 50.0, value_parser = parse_rate)]
    pub max_p99: f64,
    /// A failing step is run again this many times at the same rate before the run stops
    /// (a shared machine has bursts of other work).
    #[arg(long, default_value_t = 1)]
    pub step_retries: u32,
    /// Processes whose CPU time (/proc utime + stime) is reported per step, as LABEL=PID or
    /// LABEL=PID,PID,…; repeatable (e.g. --measure-pid gateway=41,42 --measure-pid redis=40).
    #[arg(long = "measure-pid", value_name = "LABEL=PIDS", value_parser = parse_measure_pids)]
    pub measure_pids: Vec<(String, Vec<u32>)>,
    /// Redis servers whose own CPU time (INFO cpu: used_cpu_user + used_cpu_sys) is reported
    /// per step, as LABEL=HOST:PORT; repeatable (one per shard of a Redis Cluster).
    #[arg(long = "measure-redis", value_name = "LABEL=ADDR", value_parser = parse_measure_redis)]
    pub measure_redis: Vec<(String, SocketAddr)>,
}

/// The server's client protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Roomcast,
    Socketio,
}

/// How members are spread over the gateway URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Spread,
    Room,
}

#[derive(Debug, Clone, Args)]
pub struct PublishApiArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub rooms: RoomArgs,
    /// Room-service gRPC endpoint (loopback).
    #[arg(long, default_value = "http://127.0.0.1:50051", value_parser = parse_grpc_url)]
    pub grpc: String,
    /// Server API key, sent as `authorization: Bearer <key>`.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Publishing lanes (each owns one room round-robin); default one per room.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub publishers: Option<u32>,
    /// Publishes in flight at once, over all lanes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Up to this many publishes per call: above 1, the lanes' publishes go out in
    /// `ServerApi.PublishBatch` calls of whatever piled up while earlier calls were in flight
    /// (at most --max-in-flight / N calls at once), as a backend draining a queue would send
    /// them; 1 sends each with `Publish`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub batch: u32,
}

/// A gateway WebSocket URL, checked: `ws://`, loopback host, explicit path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// As given (without a token).
    pub url: String,
    pub addr: SocketAddr,
}

impl WsUrl {
    /// The URL carrying `token` in the query, as browsers do.
    pub fn with_token(&self, token: &str) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}token={token}", self.url)
    }
}

pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Rates a `--steps` run takes at most (each may run 1 + --step-retries times).
pub const MAX_STEPS: usize = 32;

/// Parses the command line; cross-field rules get the same kind of message as clap's own.
pub fn parse() -> Cli {
    let cli = Cli::parse();
    if let Err(message) = validate(&cli) {
        Cli::command()
            .error(ErrorKind::ArgumentConflict, message)
            .exit();
    }
    cli
}

/// Rules clap's attributes cannot express.
pub fn validate(cli: &Cli) -> Result<(), String> {
    let common = cli.scenario.common();
    if common.token.is_none() && common.secret.is_none() {
        return Err(
            "no credentials: give --secret (or JWT_SECRET) to mint a token per connection, \
             or --token"
                .into(),
        );
    }
    match &cli.scenario {
        Scenario::Connections(a) => {
            if a.hold.is_zero() {
                return Err("--hold must be more than 0".into());
            }
        }
        Scenario::Fanout(a) => {
            if let Some(p) = a.publishers
                && p < a.rooms.rooms
            {
                return Err(format!(
                    "--publishers {p} is less than --rooms {}: every room needs a publisher",
                    a.rooms.rooms
                ));
            }
            check_publishing(common, &a.rooms)?;
            if a.steps.steps.len() > MAX_STEPS {
                return Err(format!("--steps: at most {MAX_STEPS} rates"));
            }
            if a.steps.step_duration.is_zero() {
                return Err("--step-duration must be more than 0".into());
            }
            if let Some((first, end)) = a.worker_rooms
                && end > a.rooms.rooms
            {
                return Err(format!(
                    "--worker-rooms {first}:{end} is past --rooms {}",
                    a.rooms.rooms
                ));
            }
        }
        Scenario::PublishApi(a) => {
            if a.api_key.is_none() {
                return Err("publish-api needs --api-key (or API_KEY)".into());
            }
            if let Some(p) = a.publishers
                && p < a.rooms.rooms
            {
                return Err(format!(
                    "--publishers {p} is less than --rooms {}: every room needs a lane",
                    a.rooms.rooms
                ));
            }
            check_publishing(common, &a.rooms)?;
        }
    }
    Ok(())
}

fn check_publishing(common: &CommonArgs, rooms: &RoomArgs) -> Result<(), String> {
    if rooms.rooms > rooms.subscribers {
        return Err(format!(
            "--rooms {} is more than --subscribers {}: some rooms would have no subscriber",
            rooms.rooms, rooms.subscribers
        ));
    }
    if common.duration.is_some_and(|d| d.is_zero()) {
        return Err("--duration must be more than 0".into());
    }
    // Room frames are capped at 64 KiB by default; leave room for the envelope.
    if rooms.payload > 60_000 {
        return Err(format!(
            "--payload {} is above 60000 bytes (the gateway's default frame limit is 64 KiB)",
            rooms.payload
        ));
    }
    Ok(())
}

/// `500ms`, `10s`, `2m`, `1h` or plain seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 500ms, 10s, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds > 7.0 * 86_400.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("`{s}` is not a positive rate (per second)")),
    }
}

fn parse_rate_or_zero(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r >= 0.0 => Ok(r),
        _ => Err(format!("`{s}` is not a rate (per second, 0 for unlimited)")),
    }
}

fn parse_workers(s: &str) -> Result<Workers, String> {
    if s == "auto" {
        return Ok(Workers::Auto);
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=64).contains(&n) => Ok(Workers::Fixed(n)),
        _ => Err(format!("`{s}`: expected `auto` or a number from 1 to 64")),
    }
}

/// `FIRST:END`, a half-open range of room numbers.
fn parse_room_range(s: &str) -> Result<(u32, u32), String> {
    let parsed = s
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
    match parsed {
        Some((a, b)) if a < b => Ok((a, b)),
        _ => Err(format!("`{s}`: expected FIRST:END with FIRST < END")),
    }
}

/// `LABEL=PID` or `LABEL=PID,PID,…`.
fn parse_measure_pids(s: &str) -> Result<(String, Vec<u32>), String> {
    let (label, pids) = s
        .split_once('=')
        .filter(|(l, _)| valid_label(l))
        .ok_or_else(|| format!("`{s}`: expected LABEL=PID[,PID…]"))?;
    let pids = pids
        .split(',')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| format!("`{s}`: the PIDs must be numbers"))?;
    Ok((label.to_owned(), pids))
}

/// `LABEL=HOST:PORT` (an IP address).
fn parse_measure_redis(s: &str) -> Result<(String, SocketAddr), String> {
    let (label, addr) = s
        .split_once('=')
        .filter(|(l, _)| valid_label(l))
        .ok_or_else(|| format!("`{s}`: expected LABEL=HOST:PORT"))?;
    let addr = addr
        .parse::<SocketAddr>()
        .map_err(|_| format!("`{s}`: `{addr}` is not IP:PORT"))?;
    Ok((label.to_owned(), addr))
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 64
        && l.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
}

fn parse_room_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}`: a room prefix is 1 to 64 characters of A-Z a-z 0-9 _ . : -"
        ))
    }
}

/// Host and port of a loopback URL with the given scheme.
fn loopback_addr(s: &str, scheme: &str) -> Result<(Uri, SocketAddr), String> {
    let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some(scheme) {
        return Err(format!("`{s}`: the scheme must be {scheme}://"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("`{s}` has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip: IpAddr = if host == "localhost" {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .map_err(|_| format!("`{s}`: the host must be an IP address or localhost"))?
    };
    let loopback_v4 = matches!(ip, IpAddr::V4(v4) if v4.is_loopback());
    if !loopback_v4 {
        return Err(format!(
            "`{s}`: only 127.0.0.0/8 targets are supported (client sockets bind 127.0.0.x)"
        ));
    }
    let port = uri.port_u16().unwrap_or(80);
    Ok((uri, SocketAddr::new(ip, port)))
}

fn parse_ws_url(s: &str) -> Result<WsUrl, String> {
    let (uri, addr) = loopback_addr(s.trim(), "ws")?;
    if uri.path().is_empty() || uri.path() == "/" {
        return Err(format!(
            "`{s}`: give the WebSocket path too, e.g. ws://{addr}/ws"
        ));
    }
    if uri.query().is_some_and(|q| q.contains("token=")) {
        return Err(format!(
            "`{s}`: leave the token out of the URL (use --token or --secret)"
        ));
    }
    Ok(WsUrl {
        url: s.trim().to_owned(),
        addr,
    })
}

fn parse_grpc_url(s: &str) -> Result<String, String> {
    loopback_addr(s.trim(), "http")?;
    Ok(s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn try_parse(args: &[&str]) -> Result<Cli, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        validate(&cli)?;
        Ok(cli)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn urls_are_checked() {
        let u = parse_ws_url("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(u.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(u.with_token("t"), "ws://127.0.0.1:8080/ws?token=t");
        assert_eq!(
            parse_ws_url("ws://localhost:9/ws?x=1")
                .unwrap()
                .with_token("t"),
            "ws://localhost:9/ws?x=1&token=t"
        );
        assert!(parse_ws_url("http://127.0.0.1:8080/ws").is_err());
        assert!(parse_ws_url("ws://10.0.0.1:8080/ws").is_err());
        assert!(parse_ws_url("ws://example.com/ws").is_err());
        assert!(parse_ws_url("ws://127.0.0.1:8080").is_err());
        assert!(parse_ws_url("ws://127.0.0.1:8080/ws?token=abc").is_err());
        assert!(parse_grpc_url("http://127.0.0.1:50051").is_ok());
        assert!(parse_grpc_url("https://127.0.0.1:50051").is_err());
    }

    #[test]
    fn comma_separated_and_repeated_urls() {
        let cli = try_parse(&[
            "loadgen",
            "connections",
            "--secret",
            "s",
            "--url",
            "ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws",
            "--url",
            "ws://127.0.0.1:3/ws",
        ])
        .unwrap();
        let ports: Vec<u16> = cli
            .scenario
            .common()
            .urls
            .iter()
            .map(|u| u.addr.port())
            .collect();
        assert_eq!(ports, [1, 2, 3]);
    }

    #[test]
    fn cross_field_rules() {
        // Credentials come from the flags here; the test must not depend on JWT_SECRET.
        let base = ["loadgen", "fanout", "--token", "t"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            try_parse(&v)
        };
        assert!(with(&[]).is_ok());
        let err = with(&["--rooms", "3", "--publishers", "2"]).unwrap_err();
        assert!(err.contains("every room needs a publisher"), "{err}");
        let err = with(&["--rooms", "5", "--subscribers", "4"]).unwrap_err();
        assert!(err.contains("no subscriber"), "{err}");
        let err = with(&["--rate", "0"]).unwrap_err();
        assert!(err.contains("positive rate"), "{err}");
        let err = with(&["--payload", "100000"]).unwrap_err();
        assert!(err.contains("frame limit"), "{err}");
        let err = with(&["--room-prefix", "bad name"]).unwrap_err();
        assert!(err.contains("room prefix"), "{err}");
    }

    #[test]
    fn workers_values() {
        assert_eq!(parse_workers("auto").unwrap(), Workers::Auto);
        assert_eq!(parse_workers("3").unwrap(), Workers::Fixed(3));
        assert!(parse_workers("0").is_err());
        assert!(parse_workers("many").is_err());
    }
}
