//! `floor`: the floor reference of the benchmarks, the smallest server that does Roomcast's
//! fan-out job on one machine, so that bench/run.sh can say how far above the kernel's own cost
//! a delivery is.
//!
//! It speaks just enough of Roomcast's client protocol for `loadgen fanout`: a WebSocket
//! upgrade on any path (the token in the query is not checked), a `connected` frame, `join`
//! (answered by `joined` with the room's last offset) and `publish` (answered by `published`;
//! every other member gets a `message` frame with the next offset of the room, the sender's
//! `clientId` and the `data` as sent). Nothing else: no authentication, no history, no presence,
//! no Redis, one process.
//!
//! The delivery path is the point. A publish builds the complete WebSocket frame once, and the
//! task that read it writes those bytes to each member's socket with one `write` system call
//! each (`TcpStream::try_write`, straight from the publisher's task: no queue or wake-up per
//! recipient). Only a socket that does not take a whole frame gets a backlog, which that
//! connection's own task flushes when the socket is writable; above 4 MiB of backlog the member
//! is closed. A room's members are split into lanes, one per runtime thread (by connection
//! number, so a member stays in its lane): a big room's fan-out runs on every core, the
//! publisher's task writing the first lane and one task per other lane writing the rest; a room
//! of fewer than 256 members is written by the publisher's task alone. Each lane sends in offset
//! order: the first task to find it idle delivers, and publishes that arrive meanwhile are
//! queued (each with the lane's members of the moment it was published); a queue that formed is
//! written by one task that yields between messages, so no task waits on another's fan-out and
//! readers keep reading while a lane catches up.
//!
//! ```text
//! floor [--addr 127.0.0.1:7700] [--threads N]
//! ```
//!
//! `GET /healthz` answers `ok`. Rooms are never removed (a benchmark run makes a few thousand).

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Largest client frame accepted (Roomcast's default `MAX_FRAME_BYTES`).
const MAX_FRAME: usize = 64 * 1024;
/// Bytes a member may have waiting for its socket before it is closed as too slow.
const MAX_BACKLOG: usize = 4 << 20;
/// Rooms with at least this many members are written by one task per lane.
const SPLIT_MIN: usize = 256;
/// Largest HTTP upgrade request.
const MAX_REQUEST: usize = 8 * 1024;

const USAGE: &str = "usage: floor [--addr HOST:PORT] [--threads N]\n\
  --addr      where to listen [127.0.0.1:7700]\n\
  --threads   runtime worker threads [one per CPU]";

fn main() {
    let mut addr = "127.0.0.1:7700".to_owned();
    let mut threads: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => {
                addr = args
                    .next()
                    .unwrap_or_else(|| usage_error("--addr needs a value"))
            }
            "--threads" => {
                threads = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|&n| n > 0)
                        .unwrap_or_else(|| usage_error("--threads needs a positive number")),
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => usage_error(&format!("unknown argument '{other}'")),
        }
    }
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().worker_threads(threads);
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floor: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(&addr, threads)) {
        eprintln!("floor: {addr}: {e}");
        std::process::exit(1);
    }
}

fn usage_error(message: &str) -> ! {
    eprintln!("floor: {message}\n{USAGE}");
    std::process::exit(2);
}

async fn serve(addr: &str, lanes: usize) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!(
        "floor listening on ws://{}/ws, pid {}",
        listener.local_addr()?,
        std::process::id()
    );
    let state = Arc::new(State {
        next_id: AtomicU64::new(0),
        rooms: Mutex::new(HashMap::new()),
        lanes,
    });
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, mostly: let some close.
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = state.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            stream,
            out: Mutex::new(Out::default()),
            wake: Notify::new(),
        });
        tokio::spawn(connection(state.clone(), conn));
    }
}

struct State {
    next_id: AtomicU64,
    rooms: Mutex<HashMap<String, RoomRef>>,
    /// Lanes per room: the runtime's threads.
    lanes: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// -------------------------------------------------------------------------------------------
// A connection and its socket
// -------------------------------------------------------------------------------------------

struct Conn {
    id: u64,
    stream: TcpStream,
    out: Mutex<Out>,
    /// Wakes the connection's task: a backlog to flush, or the connection closed.
    wake: Notify,
}

#[derive(Default)]
struct Out {
    /// Bytes the socket did not take yet; while there are any, later frames queue behind them.
    backlog: Vec<u8>,
    closed: bool,
}

impl Conn {
    /// Writes `frame` with one system call when nothing is queued (the common case).
    fn send(&self, frame: &[u8]) {
        let mut out = lock(&self.out);
        if out.closed {
            return;
        }
        if !out.backlog.is_empty() {
            if out.backlog.len() + frame.len() > MAX_BACKLOG {
                out.closed = true;
                drop(out);
                self.wake.notify_one();
            } else {
                out.backlog.extend_from_slice(frame);
            }
            return;
        }
        match self.stream.try_write(frame) {
            Ok(n) if n == frame.len() => return,
            Ok(n) => out.backlog.extend_from_slice(&frame[n..]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => out.backlog.extend_from_slice(frame),
            Err(_) => out.closed = true,
        }
        drop(out);
        self.wake.notify_one();
    }

    /// Writes the backlog while the socket takes it.
    fn flush(&self) {
        let mut out = lock(&self.out);
        while !out.backlog.is_empty() && !out.closed {
            match self.stream.try_write(&out.backlog) {
                Ok(n) => {
                    out.backlog.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => out.closed = true,
            }
        }
    }

    fn has_backlog(&self) -> bool {
        !lock(&self.out).backlog.is_empty()
    }

    fn is_closed(&self) -> bool {
        lock(&self.out).closed
    }

    /// Sends a close frame (best effort) and stops sending anything else.
    fn close(&self, code: u16) {
        let [a, b] = code.to_be_bytes();
        self.send(&[0x88, 2, a, b]);
        lock(&self.out).closed = true;
    }
}

async fn connection(state: Arc<State>, conn: Arc<Conn>) {
    let mut pending = match handshake(&conn).await {
        Some(rest) => rest,
        None => return,
    };
    conn.send(&text_frame(&format!(
        r#"{{"type":"connected","clientId":"c{}"}}"#,
        conn.id
    )));
    let mut joined: HashMap<String, RoomRef> = HashMap::new();
    let mut open = frames(&state, &conn, &mut joined, &mut pending);
    while open {
        let backlog = conn.has_backlog();
        tokio::select! {
            ready = conn.stream.readable() => {
                if ready.is_err() {
                    break;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match conn.stream.try_read(&mut buf) {
                        Ok(0) => {
                            open = false;
                            break;
                        }
                        Ok(n) => {
                            pending.extend_from_slice(&buf[..n]);
                            if !frames(&state, &conn, &mut joined, &mut pending) {
                                open = false;
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    }
                }
            }
            _ = conn.wake.notified() => {}
            ready = conn.stream.writable(), if backlog => {
                if ready.is_err() {
                    break;
                }
                conn.flush();
            }
        }
        if conn.is_closed() {
            break;
        }
    }
    conn.flush();
    lock(&conn.out).closed = true;
    for room in joined.values() {
        let mut r = lock(room);
        let lane = r.lane_of(conn.id);
        let l = &mut r.lanes[lane];
        let members: Vec<Arc<Conn>> = l
            .members
            .iter()
            .filter(|m| m.id != conn.id)
            .cloned()
            .collect();
        l.members = Arc::new(members);
        r.members -= 1;
    }
}

/// Reads the HTTP request and answers it: the upgrade (returns the bytes read past the
/// request), `/healthz`, or 400.
async fn handshake(conn: &Conn) -> Option<Vec<u8>> {
    let mut req = Vec::with_capacity(1024);
    let end = loop {
        conn.stream.readable().await.ok()?;
        let mut buf = [0u8; 2048];
        match conn.stream.try_read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if req.len() > MAX_REQUEST {
            return None;
        }
    };
    let head = std::str::from_utf8(&req[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let path = lines.next()?.strip_prefix("GET ")?.split(' ').next()?;
    let key = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim())
    });
    let Some(key) = key else {
        let response: &[u8] = if path == "/healthz" {
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
        } else {
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        };
        conn.send(response);
        return None;
    };
    conn.send(
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        )
        .as_bytes(),
    );
    Some(req.split_off(end + 4))
}

/// Handles the complete client frames in `pending` and keeps the rest; false once the
/// connection is to close.
fn frames(
    state: &State,
    conn: &Arc<Conn>,
    joined: &mut HashMap<String, RoomRef>,
    pending: &mut Vec<u8>,
) -> bool {
    let mut at = 0;
    let open = loop {
        let b = &pending[at..];
        if b.len() < 2 {
            break true;
        }
        let (fin, opcode, masked) = (b[0] & 0x80 != 0, b[0] & 0x0f, b[1] & 0x80 != 0);
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => break true,
            n => (usize::from(n), 2),
        };
        if !masked {
            conn.close(1002);
            break false;
        }
        if len > MAX_FRAME {
            conn.close(1009);
            break false;
        }
        if b.len() < header + 4 + len {
            break true;
        }
        let mask = [b[header], b[header + 1], b[header + 2], b[header + 3]];
        let start = at + header + 4;
        at = start + len;
        for (i, byte) in pending[start..at].iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
        let payload = &pending[start..at];
        match (fin, opcode) {
            (true, 0x1) => command(state, conn, joined, payload),
            (true, 0x8) => {
                // Echo the close code, if any, and stop.
                let code = payload
                    .get(..2)
                    .map_or(1000, |c| u16::from_be_bytes([c[0], c[1]]));
                conn.close(code);
                break false;
            }
            (true, 0x9) => {
                let mut pong = vec![0x8a, payload.len() as u8];
                pong.extend_from_slice(payload);
                conn.send(&pong);
            }
            (true, 0xa) => {}
            // Binary and fragmented frames: the load generator sends neither.
            _ => {
                conn.close(1003);
                break false;
            }
        }
    };
    pending.drain(..at);
    open
}

// -------------------------------------------------------------------------------------------
// Commands
// -------------------------------------------------------------------------------------------

#[derive(Deserialize)]
struct Command<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    id: Option<u64>,
    #[serde(borrow)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

fn command(state: &State, conn: &Arc<Conn>, joined: &mut HashMap<String, RoomRef>, text: &[u8]) {
    let Ok(cmd) = serde_json::from_slice::<Command<'_>>(text) else {
        conn.send(&error_frame(None, "bad_request"));
        return;
    };
    match (cmd.kind.as_ref(), cmd.room.as_deref()) {
        ("join", Some(room)) => join(state, conn, joined, room, cmd.id),
        ("publish", Some(room)) => match (joined.get(room), cmd.data) {
            (Some(r), Some(data)) => publish(conn, r, cmd.id, data),
            (None, _) => conn.send(&error_frame(cmd.id, "not_joined")),
            (_, None) => conn.send(&error_frame(cmd.id, "bad_request")),
        },
        _ => conn.send(&error_frame(cmd.id, "bad_request")),
    }
}

fn join(
    state: &State,
    conn: &Arc<Conn>,
    joined: &mut HashMap<String, RoomRef>,
    room: &str,
    id: Option<u64>,
) {
    if let Some(r) = joined.get(room) {
        let r = lock(r);
        conn.send(&text_frame(&format!(
            r#"{{"type":"joined","id":{},"room":{},"offset":{}}}"#,
            id_json(id),
            r.name_json,
            r.offset
        )));
        return;
    }
    let r = lock(&state.rooms)
        .entry(room.to_owned())
        .or_insert_with(|| Arc::new(Mutex::new(Room::new(room, state.lanes))))
        .clone();
    {
        let mut g = lock(&r);
        let lane = g.lane_of(conn.id);
        let l = &mut g.lanes[lane];
        let mut members = Vec::with_capacity(l.members.len() + 1);
        members.extend(l.members.iter().cloned());
        members.push(conn.clone());
        l.members = Arc::new(members);
        g.members += 1;
        // Under the room's lock: every message published after this offset is queued after
        // the reply.
        conn.send(&text_frame(&format!(
            r#"{{"type":"joined","id":{},"room":{},"offset":{}}}"#,
            id_json(id),
            g.name_json,
            g.offset
        )));
    }
    joined.insert(room.to_owned(), r);
}

fn publish(conn: &Conn, room: &RoomRef, id: Option<u64>, data: &RawValue) {
    let mut mine: Vec<(usize, Pending)> = Vec::new();
    let (reply, split) = {
        let mut r = lock(room);
        r.offset += 1;
        let message: Arc<[u8]> = text_frame(&format!(
            r#"{{"type":"message","room":{},"offset":{},"clientId":"c{}","data":{}}}"#,
            r.name_json,
            r.offset,
            conn.id,
            data.get()
        ))
        .into();
        let reply = text_frame(&format!(
            r#"{{"type":"published","id":{},"room":{},"offset":{}}}"#,
            id_json(id),
            r.name_json,
            r.offset
        ));
        for (i, lane) in r.lanes.iter_mut().enumerate() {
            if lane.members.is_empty() {
                continue;
            }
            let p = Pending {
                frame: message.clone(),
                sender: conn.id,
                members: lane.members.clone(),
            };
            if lane.delivering {
                lane.queue.push_back(p);
            } else {
                lane.delivering = true;
                mine.push((i, p));
            }
        }
        (reply, r.members >= SPLIT_MIN)
    };
    conn.send(&reply);
    let mut inline = Vec::new();
    for (k, (lane, p)) in mine.into_iter().enumerate() {
        if split && k > 0 {
            let room = room.clone();
            tokio::spawn(async move {
                write_all(&p);
                tokio::task::yield_now().await;
                drain(room, lane).await;
            });
        } else {
            inline.push((lane, p));
        }
    }
    for (lane, p) in inline {
        deliver(room, lane, p);
    }
}

/// Writes `p`; if more was queued to the lane meanwhile, hands the lane to a task that writes
/// the rest, so a publisher's task goes back to reading its own socket.
fn deliver(room: &RoomRef, lane: usize, p: Pending) {
    write_all(&p);
    let mut r = lock(room);
    let l = &mut r.lanes[lane];
    if l.queue.is_empty() {
        l.delivering = false;
    } else {
        drop(r);
        tokio::spawn(drain(room.clone(), lane));
    }
}

/// Writes a lane's queued messages in order until the queue is empty, yielding between
/// messages so the runtime's other tasks (readers, flushes) run too.
async fn drain(room: RoomRef, lane: usize) {
    loop {
        let next = {
            let mut r = lock(&room);
            let l = &mut r.lanes[lane];
            match l.queue.pop_front() {
                Some(p) => p,
                None => {
                    l.delivering = false;
                    return;
                }
            }
        };
        write_all(&next);
        tokio::task::yield_now().await;
    }
}

/// One message to each member of a lane but its sender: one write each.
fn write_all(p: &Pending) {
    for m in p.members.iter() {
        if m.id != p.sender {
            m.send(&p.frame);
        }
    }
}

type RoomRef = Arc<Mutex<Room>>;

struct Room {
    /// The name as a JSON string, ready to paste into frames.
    name_json: String,
    offset: u64,
    members: usize,
    lanes: Vec<Lane>,
}

/// The members of a room on one lane, and what is being delivered to them.
#[derive(Default)]
struct Lane {
    /// Copied on join and leave, so a publish takes the list of the moment with one clone.
    members: Arc<Vec<Arc<Conn>>>,
    /// Messages published while another task delivers this lane's messages.
    queue: VecDeque<Pending>,
    delivering: bool,
}

impl Room {
    fn new(name: &str, lanes: usize) -> Room {
        Room {
            name_json: serde_json::to_string(name).unwrap_or_else(|_| "\"\"".into()),
            offset: 0,
            members: 0,
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
        }
    }

    fn lane_of(&self, conn: u64) -> usize {
        (conn % self.lanes.len() as u64) as usize
    }
}

struct Pending {
    frame: Arc<[u8]>,
    sender: u64,
    members: Arc<Vec<Arc<Conn>>>,
}

// -------------------------------------------------------------------------------------------
// Frames
// -------------------------------------------------------------------------------------------

/// A complete unmasked text frame.
fn text_frame(json: &str) -> Vec<u8> {
    let n = json.len();
    let mut f = Vec::with_capacity(n + 10);
    f.push(0x81);
    if n < 126 {
        f.push(n as u8);
    } else if let Ok(n16) = u16::try_from(n) {
        f.push(126);
        f.extend_from_slice(&n16.to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
    f.extend_from_slice(json.as_bytes());
    f
}

fn error_frame(id: Option<u64>, code: &str) -> Vec<u8> {
    text_frame(&format!(
        r#"{{"type":"error","id":{},"code":"{code}"}}"#,
        id_json(id)
    ))
}

fn id_json(id: Option<u64>) -> String {
    id.map_or_else(|| "null".into(), |id| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lengths() {
        assert_eq!(text_frame("ab"), [0x81, 2, b'a', b'b']);
        let f = text_frame(&"x".repeat(300));
        assert_eq!(&f[..4], &[0x81, 126, 1, 44]);
        assert_eq!(f.len(), 304);
        let f = text_frame(&"x".repeat(70_000));
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(f.len(), 70_010);
    }

    #[test]
    fn commands_parse() {
        let c: Command<'_> =
            serde_json::from_str(r#"{"type":"publish","room":"r\"1","id":7,"data":{"t":1}}"#)
                .unwrap();
        assert_eq!(
            (c.kind.as_ref(), c.room.as_deref(), c.id),
            ("publish", Some("r\"1"), Some(7))
        );
        assert_eq!(c.data.unwrap().get(), r#"{"t":1}"#);
    }
}
