//! The Redis store against a real `redis-server`, started by each test on a free port (never
//! the default 6379) and killed when the test ends.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use roomcast_common::broker::{BrokerEvent, RedisSubscriber, Sink, Subscriber};
use roomcast_common::envelope::{Envelope, decode, encode_message, member_event, room_message};
use roomcast_common::frame::{MemberEvent, message_frame};
use roomcast_room::store::{
    ConnectionOpening, HistoryLimits, Joiner, Position, PublishItem, RedisStore, Store,
};

/// A `redis-server` child process on its own port.
struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
            listener.local_addr().expect("local address").port()
        };
        let mut server = RedisServer { port, child: None };
        server.spawn();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); these tests need redis-server on PATH")
            });
        self.child = Some(child);
        let client = redis::Client::open(self.url()).expect("redis url");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                // The answer must come from our child, not from a server that already held the
                // port (ours would then have exited).
                let exited = self.child.as_mut().map(|c| c.try_wait());
                assert!(
                    matches!(exited, Some(Ok(None))),
                    "redis-server could not take port {}",
                    self.port
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `SIG<name>` to the server (`STOP` makes it hang, `CONT` resumes it).
    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    fn command(&self, args: &[&str]) -> redis::Value {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut connection = client.get_connection().expect("connecting to redis");
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut connection).expect("redis command")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn limits(size: usize, ttl: Duration) -> HistoryLimits {
    HistoryLimits { size, ttl }
}

fn store(server: &RedisServer, size: usize) -> RedisStore {
    RedisStore::new(&server.url(), limits(size, Duration::from_secs(3600))).expect("store")
}

/// Subscribes to `channel` and collects the payloads that arrive.
async fn listen(server: &RedisServer, channel: &str) -> (RedisSubscriber, Arc<Mutex<Vec<Bytes>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let sink: Sink = Arc::new(move |event| {
        if let BrokerEvent::Message { payload, .. } = event {
            seen2.lock().unwrap().push(payload);
        }
    });
    let subscriber = RedisSubscriber::connect(&server.url(), sink).await.unwrap();
    subscriber.subscribe(channel).await.unwrap();
    (subscriber, seen)
}

/// Waits until `seen` holds `n` payloads.
async fn wait_for(seen: &Mutex<Vec<Bytes>>, n: usize) -> Vec<Bytes> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = seen.lock().unwrap().clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "got {} of {n} payloads",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn joiner<'a>(client_id: &'a str, user: &'a str, gateway_id: &'a str) -> Joiner<'a> {
    Joiner {
        client_id,
        user,
        gateway_id,
    }
}

fn offsets(messages: &[roomcast_room::store::StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_get_contiguous_offsets_delivered_in_order() {
    let server = RedisServer::start();
    let (_subscriber, seen) = listen(&server, "rc:room:race").await;
    let stores = [store(&server, 1000), store(&server, 1000)];
    let mut tasks = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        // Several tasks per store, so publishes really overlap.
        for t in 0..4 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut offsets = Vec::new();
                for n in 0..25 {
                    let data = format!("{{\"store\":{i},\"task\":{t},\"n\":{n}}}");
                    let published = store
                        .publish("race", "u", &format!("c{i}-{t}"), &data)
                        .await
                        .unwrap();
                    offsets.push((published.offset, published.epoch, data));
                }
                offsets
            }));
        }
    }
    let mut published = Vec::new();
    for task in tasks {
        published.extend(task.await.unwrap());
    }
    published.sort();
    assert_eq!(
        published.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<u64>>()
    );
    let epoch = published[0].1.clone();
    assert!(published.iter().all(|p| p.1 == epoch));

    let received = wait_for(&seen, 200).await;
    assert_eq!(received.len(), 200);
    for (expected, payload) in (1u64..).zip(received) {
        let Envelope::Message {
            offset,
            epoch: published_epoch,
            sender,
            frame,
        } = decode(payload).unwrap()
        else {
            panic!("not a message");
        };
        assert_eq!(offset, expected, "delivered out of order");
        assert_eq!(published_epoch, epoch);
        let data = &published[usize::try_from(offset - 1).unwrap()].2;
        let want = message_frame("race", offset, &epoch, "u", &sender, data);
        assert_eq!(frame.as_ref(), want.as_bytes());
    }
}

/// Inputs the publish script must pass through exactly as the Rust builders write them: user
/// ids with quotes, backslashes and non-ASCII (control characters are refused upstream, but the
/// escaping is Rust's anyway), and data JSON in every shape the service accepts (any valid JSON,
/// kept byte for byte: whitespace, escapes, raw unicode, empty strings, large numbers).
fn awkward_publishes() -> Vec<(String, String, String)> {
    let users = [
        "al\"ice \\ ☃ 𝄞 \u{7}\ttab",
        "u",
        "\\\"",
        "ünï/cødé\u{2028}\u{fffd}",
    ];
    let client_ids = ["gw-1/c\u{e9}", "c\"1", "gw:7\\x"];
    let data = [
        r#"{"text":"héllo \"world\" \u2028 ☃","n":[1,2.5e3,null,true],"o":{}}"#.to_owned(),
        r#""""#.to_owned(),
        r#"{"":""}"#.to_owned(),
        "null".to_owned(),
        "0".to_owned(),
        "[]".to_owned(),
        r#""\u0000\b\f\n\r\t\\\/\"\ud83d\ude00 😀""#.to_owned(),
        "{ \"a\" : [ 1 ,\n\t2 ] ,\r\n \"b\":{\"c\":{\"d\":[[[{}]]]}} }".to_owned(),
        "[18446744073709551616,-9223372036854775809,1e308,-0,0.000001,123456789012345678901234567890]"
            .to_owned(),
        format!("\"{}\"", "x\\\"y".repeat(16 * 1024)),
    ];
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            (
                users[i % users.len()].to_owned(),
                client_ids[i % client_ids.len()].to_owned(),
                d.clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn lua_publishes_exactly_what_the_rust_frame_builders_build() {
    let server = RedisServer::start();
    let store = store(&server, 100);
    let room = "chat:a.b_c-1";
    let (_subscriber, seen) = listen(&server, &format!("rc:room:{room}")).await;
    let cases = awkward_publishes();
    let mut published = Vec::new();
    for (user, client_id, data) in &cases {
        published.push(store.publish(room, user, client_id, data).await.unwrap());
    }
    // What history holds now, before the offsets jump (below).
    let mut held = store.history(room, Some(0), 0).await.unwrap().messages;
    // The batched path (several messages in one script call) and an offset far from 1,
    // formatted by the script's own number conversion (Lua numbers are doubles: exact up to
    // 2^53).
    server.command(&["SET", &format!("rc:{{{room}}}:seq"), "9007199254740000"]);
    let items: Vec<PublishItem<'_>> = cases
        .iter()
        .take(3)
        .map(|(user, client_id, data)| PublishItem {
            room,
            user,
            client_id,
            data_json: data,
            once: None,
        })
        .collect();
    published.extend(store.publish_many(&items).await.unwrap());
    assert_eq!(
        published.iter().map(|p| p.offset).collect::<Vec<_>>(),
        (1..=10)
            .chain(9_007_199_254_740_001..=9_007_199_254_740_003)
            .collect::<Vec<u64>>()
    );

    let payloads = wait_for(&seen, published.len()).await;
    let inputs = cases.iter().chain(cases.iter().take(3));
    for ((payload, p), (user, client_id, data)) in payloads.iter().zip(&published).zip(inputs) {
        let want = room_message(room, p.offset, &p.epoch, user, client_id, data);
        assert_eq!(payload, &want, "offset {}", p.offset);
        let frame = message_frame(room, p.offset, &p.epoch, user, client_id, data);
        assert_eq!(
            payload,
            &encode_message(p.offset, &p.epoch, client_id, &frame)
        );
        let parsed: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(parsed["user"], user.as_str());
        assert_eq!(parsed["clientId"], client_id.as_str());
        assert_eq!(
            parsed["data"],
            serde_json::from_str::<serde_json::Value>(data).unwrap()
        );
    }

    // What the gateway rebuilds from history (join recovery, `history`, gap repair) is the
    // frame that was broadcast. After the jump the window (the last 100 offsets) holds only
    // the last three.
    let page = store.history(room, Some(0), 0).await.unwrap();
    assert_eq!(
        offsets(&page.messages),
        (9_007_199_254_740_001..=9_007_199_254_740_003).collect::<Vec<u64>>()
    );
    held.extend(page.messages);
    assert_eq!(held.len(), published.len());
    for (message, payload) in held.iter().zip(&payloads) {
        let Envelope::Message { frame, .. } = decode(payload.clone()).unwrap() else {
            panic!("not a message");
        };
        let rebuilt = message_frame(
            room,
            message.offset,
            &page.epoch,
            &message.user,
            &message.client_id,
            &message.data_json,
        );
        assert_eq!(
            frame.as_ref(),
            rebuilt.as_bytes(),
            "offset {}",
            message.offset
        );
    }
}

#[tokio::test]
async fn member_events_are_published_as_built() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    let room = "r";
    let (_subscriber, seen) = listen(&server, "rc:room:r").await;
    let (user, client_id) = ("al\"ice \\ ☃ 𝄞", "gw-1/c\u{e9}");
    store
        .join(room, joiner(client_id, user, "gw"), None)
        .await
        .unwrap();
    assert!(store.leave(room, client_id, user).await.unwrap());
    let payloads = wait_for(&seen, 2).await;
    assert_eq!(
        payloads,
        vec![
            member_event(MemberEvent::Joined, room, user, client_id),
            member_event(MemberEvent::Left, room, user, client_id),
        ]
    );
}

#[tokio::test]
async fn history_is_bounded_by_count() {
    let server = RedisServer::start();
    let store = store(&server, 5);
    for n in 1..=8 {
        store.publish("r", "u", "c", &n.to_string()).await.unwrap();
    }
    let page = store.history("r", None, 0).await.unwrap();
    assert_eq!(page.offset, 8);
    assert_eq!(offsets(&page.messages), vec![4, 5, 6, 7, 8]);
    assert_eq!(page.messages[0].data_json, "4");
    let page = store.history("r", Some(6), 0).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![7, 8]);
    let page = store.history("r", Some(0), 2).await.unwrap();
    assert_eq!(offsets(&page.messages), vec![4, 5]);
    let page = store.history("r", None, 100).await.unwrap();
    assert_eq!(page.messages.len(), 5);
    assert!(
        store
            .history("r", Some(8), 0)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert!(
        store
            .history("r", Some(u64::MAX), 0)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    let stats = store.room_stats("r").await.unwrap();
    assert_eq!(
        (stats.offset, stats.history_len, stats.epoch),
        (8, 5, page.epoch)
    );
    // The stream itself is trimmed approximately: it may hold a few more.
    let held = xlen(&server, "rc:{r}:hist");
    assert!((5..=8).contains(&held), "{held} entries");
}

fn xlen(server: &RedisServer, key: &str) -> i64 {
    match server.command(&["XLEN", key]) {
        redis::Value::Int(n) => n,
        other => panic!("XLEN answered {other:?}"),
    }
}

/// Trimming by count is approximate in storage (`XADD MAXLEN ~`: whole stream nodes only) and
/// exact as clients see it: history, recovery and stats never reach past the last `size`
/// offsets, however many entries the stream still holds.
#[tokio::test]
async fn history_never_serves_more_than_its_size_though_the_stream_holds_more() {
    let server = RedisServer::start();
    let store = store(&server, 5);
    let j = joiner("c1", "alice", "gw1");
    let joined = store.join("r", j, None).await.unwrap();
    for n in 1..=250 {
        store.publish("r", "u", "c", &n.to_string()).await.unwrap();
    }
    let held = xlen(&server, "rc:{r}:hist");
    // More than the size (the approximation), at most a stream node (100 entries) more.
    assert!((6..=105).contains(&held), "the stream holds {held} entries");
    assert_eq!(
        offsets(&store.history("r", None, 0).await.unwrap().messages),
        vec![246, 247, 248, 249, 250]
    );
    assert_eq!(
        offsets(&store.history("r", Some(200), 0).await.unwrap().messages),
        vec![246, 247, 248, 249, 250]
    );
    assert_eq!(
        offsets(&store.history("r", Some(240), 2).await.unwrap().messages),
        vec![246, 247]
    );
    let at = |offset| Position {
        epoch: joined.epoch.clone(),
        offset,
    };
    // Offset 245 may still be in the stream but is outside the window: no recovery.
    let r = store.join("r", j, Some(&at(244))).await.unwrap();
    assert_eq!((r.recovered, r.missed.len()), (Some(false), 0));
    let r = store.join("r", j, Some(&at(245))).await.unwrap();
    assert_eq!(r.recovered, Some(true));
    assert_eq!(offsets(&r.missed), vec![246, 247, 248, 249, 250]);
    assert_eq!(store.room_stats("r").await.unwrap().history_len, 5);
}

/// The commands Redis ran since the last `CONFIG RESETSTAT`, by name.
fn command_calls(server: &RedisServer) -> impl Fn(&str) -> u64 {
    let stats = match server.command(&["INFO", "commandstats"]) {
        redis::Value::VerbatimString { text, .. } => text,
        redis::Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
        other => panic!("INFO answered {other:?}"),
    };
    move |command: &str| -> u64 {
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
    }
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    match server.command(&["PTTL", key]) {
        redis::Value::Int(ms) => ms,
        other => panic!("PTTL answered {other:?}"),
    }
}

/// A publish keeps the room alive without refreshing three TTLs: the first refreshes the
/// epoch (1.25 TTL, by the `GETEX` that reads it) and checks the offset's and stream's expiry
/// (pushed to 1.75 TTL when less than 1.25 is left); for a fifth of a TTL after that, this
/// instance's publishes to the room only read the epoch. It still lives a TTL after the last.
#[tokio::test]
async fn publishes_refresh_the_room_only_every_fifth_of_a_ttl() {
    let server = RedisServer::start();
    let ttl = Duration::from_secs(100);
    let store = RedisStore::new(&server.url(), limits(10, ttl)).unwrap();
    server.command(&["CONFIG", "RESETSTAT"]);
    for n in 1..=50 {
        store.publish("r", "u", "c", &n.to_string()).await.unwrap();
    }
    let calls = command_calls(&server);
    assert_eq!(calls("getex"), 1);
    assert_eq!(calls("pttl"), 1);
    // Once, for the first publish: offset and stream each.
    assert_eq!(calls("pexpire"), 2);
    assert_eq!(calls("incr"), 50);
    let epoch = pttl(&server, "rc:{r}:epoch");
    assert!(epoch > 100_000 && epoch <= 125_000, "{epoch}");
    for key in ["rc:{r}:seq", "rc:{r}:hist"] {
        let left = pttl(&server, key);
        assert!(left > 125_000 && left <= 175_000, "{key}: {left}");
    }
}

/// A room whose keys were dropped (and made again by a read) while this instance still counts
/// it as refreshed gets its lifetimes from the next publish all the same: nothing is left
/// without an expiry.
#[tokio::test]
async fn a_room_made_again_gets_its_lifetimes_from_a_lasting_publish() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), limits(10, Duration::from_secs(100))).unwrap();
    let first = store.publish("r", "u", "c", "1").await.unwrap();
    server.command(&["DEL", "rc:{r}:epoch", "rc:{r}:seq", "rc:{r}:hist"]);
    // The read starts a new epoch with no offset yet.
    let page = store.history("r", None, 0).await.unwrap();
    assert_ne!(page.epoch, first.epoch);
    server.command(&["CONFIG", "RESETSTAT"]);
    let next = store.publish("r", "u", "c", "2").await.unwrap();
    assert_eq!((next.epoch.as_str(), next.offset), (page.epoch.as_str(), 1));
    let calls = command_calls(&server);
    assert_eq!(calls("getex"), 0, "the publish went lasting");
    assert!(pttl(&server, "rc:{r}:epoch") > 100_000);
    for key in ["rc:{r}:seq", "rc:{r}:hist"] {
        assert!(pttl(&server, key) > 125_000, "{key} has no expiry");
    }
    // Keys dropped with nothing reading them: the lasting publish makes the room itself.
    server.command(&["DEL", "rc:{r}:epoch", "rc:{r}:seq", "rc:{r}:hist"]);
    let again = store.publish("r", "u", "c", "3").await.unwrap();
    assert_eq!(again.offset, 1);
    assert_ne!(again.epoch, page.epoch);
    for key in ["rc:{r}:epoch", "rc:{r}:seq", "rc:{r}:hist"] {
        assert!(pttl(&server, key) > 100_000, "{key} has no expiry");
    }
}

#[tokio::test]
async fn history_is_bounded_by_age() {
    let server = RedisServer::start();
    let store = RedisStore::new(&server.url(), limits(100, Duration::from_secs(2))).unwrap();
    let first = store.publish("r", "u", "c", "1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    store.publish("r", "u", "c", "2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Message 1 is 2.2 s old, message 2 is 1 s old; the keys live on (refreshed by publish 2).
    let page = store.history("r", None, 0).await.unwrap();
    assert_eq!(page.epoch, first.epoch);
    assert_eq!(page.offset, 2);
    assert_eq!(offsets(&page.messages), vec![2]);
    let recovered = store
        .join(
            "r",
            joiner("c9", "u", "g"),
            Some(&Position {
                epoch: first.epoch.clone(),
                offset: 0,
            }),
        )
        .await
        .unwrap();
    assert_eq!(recovered.recovered, Some(false));
    // Idle past the epoch's life: everything is gone and offsets restart under a new epoch.
    // (The join above refreshed the room, so wait 1.25 TTL from now.)
    tokio::time::sleep(Duration::from_millis(2800)).await;
    let next = store.publish("r", "u", "c", "3").await.unwrap();
    assert_eq!(next.offset, 1);
    assert_ne!(next.epoch, first.epoch);
}

#[tokio::test]
async fn join_recovers_only_what_history_still_holds() {
    let server = RedisServer::start();
    let store = store(&server, 3);
    let j = joiner("c1", "alice", "gw1");
    let joined = store.join("r", j, None).await.unwrap();
    assert_eq!((joined.offset, joined.recovered), (0, None));
    assert!(!joined.epoch.is_empty());
    let at = |offset| Position {
        epoch: joined.epoch.clone(),
        offset,
    };
    // Nothing published, nothing missed.
    let r = store.join("r", j, Some(&at(0))).await.unwrap();
    assert_eq!((r.recovered, r.missed.len()), (Some(true), 0));
    for n in 1..=2 {
        let p = store
            .publish("r", "bob", "c2", &n.to_string())
            .await
            .unwrap();
        assert_eq!(p.epoch, joined.epoch);
    }
    let r = store.join("r", j, Some(&at(2))).await.unwrap();
    assert_eq!((r.recovered, r.missed.len(), r.offset), (Some(true), 0, 2));
    let r = store.join("r", j, Some(&at(0))).await.unwrap();
    assert_eq!(r.recovered, Some(true));
    assert_eq!(offsets(&r.missed), vec![1, 2]);
    assert_eq!(
        (r.missed[0].user.as_str(), r.missed[0].client_id.as_str()),
        ("bob", "c2")
    );
    for n in 3..=5 {
        store
            .publish("r", "bob", "c2", &n.to_string())
            .await
            .unwrap();
    }
    // History holds 3..=5: offset 2 is gone.
    let r = store.join("r", j, Some(&at(1))).await.unwrap();
    assert_eq!((r.recovered, r.missed.len()), (Some(false), 0));
    let r = store.join("r", j, Some(&at(2))).await.unwrap();
    assert_eq!(r.recovered, Some(true));
    assert_eq!(offsets(&r.missed), vec![3, 4, 5]);
    let other = Position {
        epoch: "0123456789abcdef".into(),
        offset: 4,
    };
    assert_eq!(
        store.join("r", j, Some(&other)).await.unwrap().recovered,
        Some(false)
    );
    assert_eq!(
        store.join("r", j, Some(&at(9))).await.unwrap().recovered,
        Some(false)
    );
    assert_eq!(
        store
            .join("r", j, Some(&at(u64::MAX)))
            .await
            .unwrap()
            .recovered,
        Some(false)
    );
}

#[tokio::test]
async fn epoch_changes_after_flushall() {
    let server = RedisServer::start();
    let store = store(&server, 100);
    let mut last = None;
    for n in 1..=3 {
        last = Some(store.publish("r", "u", "c", &n.to_string()).await.unwrap());
    }
    let before = last.unwrap();
    assert_eq!(before.offset, 3);
    server.command(&["FLUSHALL"]);
    let r = store
        .join(
            "r",
            joiner("c1", "u", "g"),
            Some(&Position {
                epoch: before.epoch.clone(),
                offset: 1,
            }),
        )
        .await
        .unwrap();
    assert_eq!(r.recovered, Some(false));
    assert_ne!(r.epoch, before.epoch);
    assert_eq!(r.offset, 0);
    let after = store.publish("r", "u", "c", "4").await.unwrap();
    assert_eq!(after.offset, 1);
    assert_eq!(after.epoch, r.epoch);
}

#[tokio::test]
async fn fails_fast_while_redis_is_down_and_recovers_after() {
    let mut server = RedisServer::start();
    let store = store(&server, 100);
    store.publish("r", "u", "c", "1").await.unwrap();
    server.stop();
    for _ in 0..2 {
        let started = Instant::now();
        let error = store.publish("r", "u", "c", "2").await.unwrap_err();
        assert!(error.is_transient(), "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        let started = Instant::now();
        assert!(store.ping().await.is_err_and(|e| e.is_transient()));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
    // Back (empty: no persistence): the store reconnects by itself, under a new epoch.
    server.spawn();
    let deadline = Instant::now() + Duration::from_secs(10);
    let published = loop {
        match store.publish("r", "u", "c", "3").await {
            Ok(published) => break published,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "store did not reconnect: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(published.offset, 1);
}

/// Publishes share batches: one waiting behind a batch that is stuck on a hung Redis still
/// fails within the bound of one operation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_fail_fast_while_redis_hangs() {
    let server = RedisServer::start();
    let store = Arc::new(store(&server, 100));
    store.publish("r", "u", "c", "1").await.unwrap();
    server.signal("STOP");
    let mut tasks = Vec::new();
    for n in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // Staggered, so some queue behind a batch already out.
            tokio::time::sleep(Duration::from_millis(n * 50)).await;
            let started = Instant::now();
            let error = store
                .publish(&format!("r{n}"), "u", "c", "2")
                .await
                .unwrap_err();
            (started.elapsed(), error)
        }));
    }
    for task in tasks {
        let (took, error) = task.await.unwrap();
        assert!(error.is_transient(), "{error:?}");
        assert!(took < Duration::from_secs(3), "took {took:?}");
    }
    server.signal("CONT");
}

#[tokio::test]
async fn unreachable_redis_is_unavailable_not_a_hang() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = RedisStore::new(
        &format!("redis://127.0.0.1:{port}"),
        HistoryLimits::default(),
    )
    .unwrap();
    let started = Instant::now();
    let error = store.history("r", None, 0).await.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn presence_joins_leaves_and_dead_gateways() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    let (_subscriber, seen) = listen(&server, "rc:room:r").await;
    store
        .gateway_heartbeat("gw-short", 1, Duration::from_millis(300), "v")
        .await
        .unwrap();
    store
        .gateway_heartbeat("gw-long", 5, Duration::from_secs(60), "v")
        .await
        .unwrap();
    store
        .join("r", joiner("c1", "alice", "gw-short"), None)
        .await
        .unwrap();
    store
        .join("r", joiner("c2", "bob", "gw-long"), None)
        .await
        .unwrap();
    store
        .join("r", joiner("c2", "bob", "gw-long"), None)
        .await
        .unwrap();
    store
        .join("r", joiner("c3", "carol", "gw-never-seen"), None)
        .await
        .unwrap();
    let users = |members: Vec<roomcast_room::store::Member>| -> Vec<String> {
        members.into_iter().map(|m| m.user).collect()
    };
    assert_eq!(
        users(store.presence("r").await.unwrap()),
        vec!["alice", "bob", "carol"]
    );
    let gateways = store.gateways().await.unwrap();
    assert_eq!(gateways.len(), 2);
    assert_eq!(gateways.iter().map(|g| g.connections).sum::<u64>(), 6);

    assert!(store.leave("r", "c3", "carol").await.unwrap());
    assert!(!store.leave("r", "c3", "carol").await.unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    // gw-short's lease ran out: alice is dropped (and announced as left).
    assert_eq!(users(store.presence("r").await.unwrap()), vec!["bob"]);
    assert_eq!(store.room_stats("r").await.unwrap().members, 1);
    let gateways = store.gateways().await.unwrap();
    assert_eq!(gateways.len(), 1);
    assert_eq!(
        (gateways[0].gateway_id.as_str(), gateways[0].connections),
        ("gw-long", 5)
    );

    let events: Vec<(String, serde_json::Value)> = wait_for(&seen, 5)
        .await
        .into_iter()
        .map(|payload| match decode(payload).unwrap() {
            Envelope::Event { exclude, frame } => {
                (exclude, serde_json::from_slice(&frame).unwrap())
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let summary: Vec<(String, String, String)> = events
        .iter()
        .map(|(exclude, v)| {
            assert_eq!(v["room"], "r");
            assert_eq!(v["clientId"].as_str(), Some(exclude.as_str()));
            (
                exclude.clone(),
                v["type"].as_str().unwrap().to_owned(),
                v["user"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_owned(), b.to_owned(), c.to_owned());
    assert_eq!(
        summary,
        vec![
            s("c1", "member_joined", "alice"),
            s("c2", "member_joined", "bob"),
            s("c3", "member_joined", "carol"),
            s("c3", "member_left", "carol"),
            s("c1", "member_left", "alice"),
        ]
    );
}

#[tokio::test]
async fn room_stats_do_not_create_rooms_and_control_is_published() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    let stats = store.room_stats("empty").await.unwrap();
    assert_eq!(
        (
            stats.epoch.as_str(),
            stats.offset,
            stats.history_len,
            stats.members
        ),
        ("", 0, 0, 0)
    );
    assert_eq!(server.command(&["DBSIZE"]), redis::Value::Int(0));
    let (_subscriber, seen) = listen(&server, roomcast_common::envelope::CONTROL_CHANNEL).await;
    store
        .publish_control(Bytes::from_static(
            b"C{\"op\":\"disconnect\",\"user\":\"u\",\"code\":1008,\"reason\":\"\"}",
        ))
        .await
        .unwrap();
    let payload = wait_for(&seen, 1).await.remove(0);
    assert!(matches!(decode(payload).unwrap(), Envelope::Control(_)));
}

#[tokio::test]
async fn sweep_removes_members_of_expired_gateways_once() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    let other_instance = self::store(&server, 10);
    let (_subscriber, seen) = listen(&server, "rc:room:s").await;
    store
        .gateway_heartbeat("gw-dying", 1, Duration::from_millis(200), "v")
        .await
        .unwrap();
    store
        .gateway_heartbeat("gw-alive", 1, Duration::from_secs(60), "v")
        .await
        .unwrap();
    store
        .join("s", joiner("d1", "dora", "gw-dying"), None)
        .await
        .unwrap();
    store
        .join("s", joiner("a1", "amy", "gw-alive"), None)
        .await
        .unwrap();
    assert_eq!(store.sweep_dead_gateways().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Two instances sweeping at once: the member is removed and announced once.
    let (a, b) = tokio::join!(
        store.sweep_dead_gateways(),
        other_instance.sweep_dead_gateways()
    );
    assert!(a.unwrap() + b.unwrap() >= 1);
    assert_eq!(store.sweep_dead_gateways().await.unwrap(), 0, "swept once");
    let left: Vec<String> = wait_for(&seen, 3)
        .await
        .into_iter()
        .filter_map(|payload| match decode(payload).unwrap() {
            Envelope::Event { frame, .. } => {
                let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
                (v["type"] == "member_left").then(|| v["clientId"].as_str().unwrap().to_owned())
            }
            _ => None,
        })
        .collect();
    assert_eq!(left, vec!["d1"]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.lock().unwrap().len(), 3, "no second member_left");
    let members: Vec<String> = store
        .presence("s")
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.client_id)
        .collect();
    assert_eq!(members, vec!["a1"]);
}

#[tokio::test]
async fn an_idempotency_key_publishes_once_within_its_window() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    let (_subscriber, seen) = listen(&server, "rc:room:r").await;
    let once = |key| keyed(key, Duration::from_millis(400), false);
    let first = store
        .publish_once("r", "u", "c", "1", once("k"))
        .await
        .unwrap();
    let again = store
        .publish_once("r", "u", "c", "1", once("k"))
        .await
        .unwrap();
    let other = store
        .publish_once("r", "u", "c", "2", once("k2"))
        .await
        .unwrap();
    assert_eq!((first.offset, again.offset, other.offset), (1, 1, 2));
    assert_eq!(first.epoch, again.epoch);
    wait_for(&seen, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "the repeat was not broadcast"
    );
    assert_eq!(store.history("r", None, 0).await.unwrap().messages.len(), 2);
    // Past the window the key is forgotten.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = store
        .publish_once("r", "u", "c", "1", once("k"))
        .await
        .unwrap();
    assert_eq!(later.offset, 3);
}

/// The gateway's first try with a key of its own is not looked up, and its record is its
/// history entry (no record key written): the retry (which goes without the flag) finds it
/// there, among other connections' publishes and tries, and is neither stored nor sent again.
#[tokio::test]
async fn a_first_try_is_not_looked_up_and_its_retry_finds_it_in_history() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    let (_subscriber, seen) = listen(&server, "rc:room:r").await;
    server.command(&["CONFIG", "RESETSTAT"]);
    let first = store
        .publish_once("r", "u", "c", "1", retry_once("retry:c:7", true))
        .await
        .unwrap();
    assert_eq!(command_calls(&server)("get"), 0);
    // The new room's epoch; no record key.
    assert_eq!(command_calls(&server)("set"), 1);
    // Later publishes: another connection's try with the same number, and this one's next.
    for (client, key) in [("d", "retry:d:7"), ("c", "retry:c:8")] {
        store
            .publish_once("r", "u", client, "2", retry_once(key, true))
            .await
            .unwrap();
    }
    let retry = store
        .publish_once("r", "u", "c", "1", retry_once("retry:c:7", false))
        .await
        .unwrap();
    assert_eq!(retry, first);
    assert_eq!(command_calls(&server)("xrevrange"), 1);
    wait_for(&seen, 3).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.lock().unwrap().len(), 3, "the retry was not broadcast");
    assert_eq!(store.history("r", None, 0).await.unwrap().messages.len(), 3);
    let records = server.command(&["KEYS", "rc:{r}:idem:*"]);
    assert_eq!(records, redis::Value::Array(vec![]), "no record keys");
}

/// A retry whose first try never reached Redis is stored, once; a room without history keeps
/// record keys for the gateway's retries.
#[tokio::test]
async fn a_retry_of_a_lost_first_try_is_stored_once() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    store.publish("r", "u", "c", "0").await.unwrap();
    let retry = store
        .publish_once("r", "u", "c", "1", retry_once("retry:c:1", false))
        .await
        .unwrap();
    let again = store
        .publish_once("r", "u", "c", "1", retry_once("retry:c:1", false))
        .await
        .unwrap();
    assert_eq!((retry.offset, again.offset), (2, 2));
    assert_eq!(store.history("r", None, 0).await.unwrap().messages.len(), 2);

    let without_history =
        RedisStore::new(&server.url(), limits(0, Duration::from_secs(3600))).expect("store");
    let first = without_history
        .publish_once("q", "u", "c", "1", retry_once("retry:c:1", true))
        .await
        .unwrap();
    let retry = without_history
        .publish_once("q", "u", "c", "1", retry_once("retry:c:1", false))
        .await
        .unwrap();
    assert_eq!(retry, first);
}

/// When more than the history size was published between a first try and its retry, history
/// no longer tells whether the first try was stored: the retry is refused, not stored again.
/// Entries older than the retry window do not count: a first try cannot be that old.
#[tokio::test]
async fn a_retry_that_history_cannot_settle_is_refused() {
    use roomcast_room::store::StoreError;
    let server = RedisServer::start();
    // Small stream nodes, so that trimming to the size removes entries soon.
    server.command(&["CONFIG", "SET", "stream-node-max-entries", "4"]);
    let store = store(&server, 10);
    store
        .publish_once("r", "u", "c", "1", retry_once("retry:c:1", true))
        .await
        .unwrap();
    for i in 0..40 {
        store.publish("r", "u", "d", &i.to_string()).await.unwrap();
    }
    assert!(xlen(&server, "rc:{r}:hist") < 41, "the stream was trimmed");
    let retry = store
        .publish_once("r", "u", "c", "1", retry_once("retry:c:1", false))
        .await;
    assert!(matches!(retry, Err(StoreError::Unsure)), "{retry:?}");
    let unknown = store
        .publish_once("r", "u", "c", "1", retry_once("retry:c:2", false))
        .await;
    assert!(matches!(unknown, Err(StoreError::Unsure)), "{unknown:?}");
    assert_eq!(store.history("r", None, 0).await.unwrap().offset, 41);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let short = keyed("retry:c:2", Duration::from_millis(200), false);
    let stored = store.publish_once("r", "u", "c", "1", short).await.unwrap();
    assert_eq!(stored.offset, 42);
}

/// The idempotency of a gateway's own key, as room-service passes it.
fn retry_once(key: &str, unused: bool) -> Option<roomcast_room::store::Once<'_>> {
    keyed(key, Duration::from_secs(30), unused)
}

/// A publish's idempotency: `key`, kept for `window`.
fn keyed(key: &str, window: Duration, unused: bool) -> Option<roomcast_room::store::Once<'_>> {
    Some(roomcast_room::store::Once {
        key,
        window,
        unused,
    })
}

#[tokio::test]
async fn history_remove_starts_a_new_epoch_and_rooms_are_listed() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    let first = store.publish("chat:a", "u", "c", "1").await.unwrap();
    store.publish("chat:b", "u", "c", "1").await.unwrap();
    store.publish("other", "u", "c", "1").await.unwrap();
    let joiner = Joiner {
        client_id: "c9",
        user: "u9",
        gateway_id: "gw",
    };
    store.join("chat:c", joiner, None).await.unwrap();
    let rooms = store.rooms("chat:", 10).await.unwrap();
    let names: Vec<&str> = rooms.iter().map(|r| r.room.as_str()).collect();
    assert_eq!(names, ["chat:a", "chat:b", "chat:c"]);
    assert_eq!((rooms[0].offset, rooms[2].members), (1, 1));
    assert_eq!(store.rooms("", 2).await.unwrap().len(), 2);

    store.remove_history("chat:a").await.unwrap();
    let next = store.publish("chat:a", "u", "c", "2").await.unwrap();
    assert_ne!(next.epoch, first.epoch);
    assert_eq!(next.offset, 1);
}

#[tokio::test]
async fn publish_many_keeps_order_even_after_redis_forgot_the_script() {
    use roomcast_room::store::PublishItem;
    let server = RedisServer::start();
    let store = store(&server, 100);
    let (_subscriber, seen) = listen(&server, "rc:room:m").await;
    store.publish("m", "u", "c", "0").await.unwrap();
    // A restarted or flushed Redis has no scripts: the batch must still run in order.
    server.command(&["SCRIPT", "FLUSH"]);
    let data: Vec<String> = (1..=50).map(|n| n.to_string()).collect();
    let items: Vec<PublishItem> = data
        .iter()
        .map(|d| PublishItem {
            room: "m",
            user: "u",
            client_id: "c",
            data_json: d,
            once: None,
        })
        .collect();
    let published = store.publish_many(&items).await.unwrap();
    let offsets: Vec<u64> = published.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (2..=51).collect::<Vec<_>>());
    let frames = wait_for(&seen, 51).await;
    let got: Vec<String> = frames
        .iter()
        .map(|payload| match decode(payload.clone()).unwrap() {
            Envelope::Message { frame, .. } => {
                let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
                v["data"].to_string()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    let want: Vec<String> = (0..=50).map(|n| n.to_string()).collect();
    assert_eq!(got, want);
}

fn opening<'a>(user: &'a str, client_id: &'a str, gateway: &'a str) -> ConnectionOpening<'a> {
    ConnectionOpening {
        user,
        client_id,
        gateway,
        limit: 2,
    }
}

/// A batch of connections is counted as one by one would: in order, a connection counted
/// once however often it comes, the limit refusing the rest, and a refused one counted after
/// all when a dead gateway held the slot.
#[tokio::test]
async fn a_batch_of_connections_counts_as_one_by_one() {
    let server = RedisServer::start();
    let store = store(&server, 10);
    store
        .gateway_heartbeat("gw-dead", 1, Duration::from_millis(200), "")
        .await
        .unwrap();
    store
        .gateway_heartbeat("gw", 1, Duration::from_secs(60), "")
        .await
        .unwrap();
    let counts = |results: Vec<Result<Result<u64, u64>, _>>| -> Vec<Result<u64, u64>> {
        results.into_iter().map(Result::unwrap).collect()
    };
    let first = store
        .connections_opened(&[
            opening("alice", "a1", "gw"),
            opening("bob", "b1", "gw-dead"),
            opening("alice", "a1", "gw"),
            opening("alice", "a2", "gw"),
            opening("alice", "a3", "gw"),
            opening("bob", "b2", "gw-dead"),
        ])
        .await;
    assert_eq!(
        counts(first),
        [Ok(1), Ok(1), Ok(1), Ok(2), Err(2), Ok(2)],
        "a1 twice counts once; a3 is over alice's limit"
    );
    // One by one agrees, and the batch recorded each user under its gateway for the sweeper.
    assert_eq!(
        store
            .connection_opened("alice", "a4", "gw", 2)
            .await
            .unwrap(),
        Err(2)
    );
    let mut redis = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let users: Vec<String> = redis::cmd("SMEMBERS")
        .arg("rc:gw:{gw}:users")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(users, ["alice"]);
    let users: Vec<String> = redis::cmd("SMEMBERS")
        .arg("rc:gw:{gw-dead}:users")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(users, ["bob"]);
    // gw-dead's lease runs out: bob's slots there are given to a new connection in a batch.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after = store
        .connections_opened(&[opening("bob", "b3", "gw"), opening("carol", "c1", "gw")])
        .await;
    assert_eq!(counts(after), [Ok(1), Ok(1)]);
    assert!(store.connections_opened(&[]).await.is_empty());
}
