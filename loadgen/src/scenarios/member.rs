//! One WebSocket member of a room: connects, joins, then counts and checks what the room
//! delivers. A publisher is a member too (it receives its room-mates' messages) that also
//! publishes in each window the run opens, on an open-loop schedule, without waiting for each
//! reply: replies are matched to their publish by id.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::Message;

use crate::args::Protocol;
use crate::client::{self, Incoming, Payload, Ws};
use crate::scenarios::context::{Ctx, Shared, Window, step_done};
use crate::scenarios::{Pacer, unix_ns};

/// Who a member is.
#[derive(Debug, Clone, Copy)]
pub struct MemberSpec {
    /// Connection number (the token's user is `load-<n>`).
    pub n: u64,
    pub room: usize,
    /// Which of the URLs it connects to.
    pub url: usize,
    /// Set for a publisher: its index among `count` publishers sharing the total rate.
    pub publisher: Option<PublisherSlot>,
}

#[derive(Debug, Clone, Copy)]
pub struct PublisherSlot {
    pub index: u32,
    pub count: u32,
}

/// What one member saw.
#[derive(Debug, Default)]
pub struct MemberResult {
    pub room: usize,
    pub setup_failure: Option<String>,
    pub deliveries: DeliveryStats,
    /// Why the connection ended before the run did.
    pub disconnected: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct DeliveryStats {
    pub received: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    pub order_violations: u64,
}

/// Checks one member's deliveries in its room: offsets must rise (Roomcast), each publisher's
/// sequence numbers too; each delivery's latency goes to its step's histogram.
pub struct Tracker {
    /// The recording task's key (its connection number), for the histogram shard.
    key: u64,
    join_offset: u64,
    last_offset: u64,
    /// This member's own acknowledged publishes: offsets it is never sent.
    own_count: u64,
    own_max: u64,
    last_seq: HashMap<String, u64>,
    pub stats: DeliveryStats,
}

impl Tracker {
    /// Offsets above `join_offset` are the ones this member should get.
    pub fn new(key: u64, join_offset: u64) -> Tracker {
        Tracker {
            key,
            join_offset,
            last_offset: join_offset,
            own_count: 0,
            own_max: 0,
            last_seq: HashMap::new(),
            stats: DeliveryStats::default(),
        }
    }

    pub fn on_message(
        &mut self,
        offset: Option<u64>,
        sender: Option<&str>,
        data: Option<&serde_json::value::RawValue>,
        shared: &Shared,
    ) {
        let now = unix_ns();
        self.stats.received += 1;
        shared.received.fetch_add(1, Relaxed);
        let payload = data.and_then(|d| serde_json::from_str::<Payload>(d.get()).ok());
        let step = shared.step(payload.as_ref().map_or(0, |p| p.s));
        if let Some(st) = step {
            st.received.fetch_add(1, Relaxed);
            st.last_delivery_ns.fetch_max(now, Relaxed);
        }
        if let Some(offset) = offset {
            if offset <= self.last_offset {
                self.stats.out_of_order += 1;
                if let Some(st) = step {
                    st.out_of_order.fetch_add(1, Relaxed);
                }
            } else {
                self.stats.gaps += offset - self.last_offset - 1;
                self.last_offset = offset;
            }
        }
        let Some(payload) = payload else { return };
        if let Some(st) = step {
            st.latency
                .record(self.key, now.saturating_sub(payload.t) / 1000);
        }
        let sender = sender.unwrap_or("");
        match self.last_seq.get_mut(sender) {
            Some(last) if payload.q <= *last => self.stats.order_violations += 1,
            Some(last) => *last = payload.q,
            None => {
                self.last_seq.insert(sender.to_owned(), payload.q);
            }
        }
    }

    /// One of this member's publishes got `offset`.
    pub fn on_own_publish(&mut self, offset: u64) {
        self.own_count += 1;
        self.own_max = self.own_max.max(offset);
    }

    pub fn finish(&mut self) -> DeliveryStats {
        if self.own_count > 0 {
            // A publisher is not sent its own messages, and its replies race its room-mates'
            // messages, so its holes are counted at the end: offsets up to the highest one
            // known, less those delivered and those it published itself.
            let highest = self.last_offset.max(self.own_max);
            let distinct = self.stats.received - self.stats.out_of_order;
            self.stats.gaps =
                (highest - self.join_offset).saturating_sub(distinct + self.own_count);
        }
        self.stats.clone()
    }
}

/// A publisher's state: the current window's schedule, and the publishes not answered yet
/// (of any window).
struct Publishing {
    step: usize,
    pacer: Pacer,
    end: Instant,
    /// The room as a JSON string.
    room_json: String,
    seq: u64,
    /// Publish id → (send time in Unix ns, step).
    pending: HashMap<u64, (u64, usize)>,
    /// Of which in the current step.
    pending_in_step: u64,
    /// The current step was counted done.
    done: bool,
}

impl Publishing {
    fn new(room: &str) -> Publishing {
        Publishing {
            step: 0,
            pacer: Pacer::new(Instant::now(), 1.0),
            end: Instant::now(),
            room_json: serde_json::to_string(room).unwrap_or_default(),
            seq: 0,
            pending: HashMap::new(),
            pending_in_step: 0,
            done: true,
        }
    }

    /// Starts a window: publisher i of P sends every P / rate seconds, shifted by i / rate so
    /// the publishers interleave instead of firing together.
    fn start(&mut self, w: &Window, slot: PublisherSlot, shared: &Shared) {
        self.mark_done(shared);
        let rate = w.rate / f64::from(slot.count.max(1));
        let phase = std::time::Duration::from_secs_f64(f64::from(slot.index) / w.rate);
        self.step = w.step;
        self.pacer = Pacer::new(w.begin + phase, rate);
        self.end = w.end;
        self.pending_in_step = 0;
        self.done = false;
    }

    /// When the next publish is due, if the window still has one.
    fn next_due(&self) -> Option<Instant> {
        let due = self.pacer.due();
        (!self.done && due < self.end).then_some(due)
    }

    /// Counts the current step done once its schedule is over and its publishes answered.
    fn check_done(&mut self, shared: &Shared) {
        if !self.done && self.pacer.due() >= self.end && self.pending_in_step == 0 {
            self.mark_done(shared);
        }
    }

    fn mark_done(&mut self, shared: &Shared) {
        if !self.done {
            self.done = true;
            step_done(shared, self.step);
        }
    }

    fn frame(&mut self, protocol: Protocol, filler: &str, tag_step: bool) -> String {
        self.seq += 1;
        let t = unix_ns();
        self.pending.insert(self.seq, (t, self.step));
        self.pending_in_step += 1;
        let seq = self.seq;
        let data = if tag_step {
            format!(
                "{{\"t\":{t},\"q\":{seq},\"s\":{},\"p\":\"{filler}\"}}",
                self.step
            )
        } else {
            format!("{{\"t\":{t},\"q\":{seq},\"p\":\"{filler}\"}}")
        };
        client::publish_frame(protocol, &self.room_json, seq, &data)
    }
}

/// Runs one member until the run stops (or its connection ends). `permit` bounds the
/// handshakes in flight and is released once joined.
pub async fn run(ctx: Arc<Ctx>, spec: MemberSpec, permit: OwnedSemaphorePermit) -> MemberResult {
    let shared = &ctx.shared;
    let protocol = ctx.dialer.protocol();
    let mut result = MemberResult {
        room: spec.room,
        ..MemberResult::default()
    };
    let room_name = &ctx.rooms[spec.room];
    let setup = async {
        let c = ctx.dialer.connect_to(spec.n, spec.url).await?;
        let mut ws = c.ws;
        let offset = client::join_as(protocol, &mut ws, room_name, ctx.join_timeout).await?;
        Ok::<_, String>((ws, offset))
    }
    .await;
    drop(permit);
    let (mut ws, join_offset) = match setup {
        Ok(v) => {
            shared.joined_per_room[spec.room].fetch_add(1, SeqCst);
            if spec.publisher.is_some() {
                shared.publishers_joined.fetch_add(1, SeqCst);
            }
            shared.setup_resolved.fetch_add(1, SeqCst);
            v
        }
        Err(reason) => {
            shared.setup_resolved.fetch_add(1, SeqCst);
            result.setup_failure = Some(reason);
            return result;
        }
    };

    let mut tracker = Tracker::new(spec.n, join_offset);
    let mut publishing = spec.publisher.map(|_| Publishing::new(room_name));
    let mut windows = ctx.window.clone();
    // Made once: a fresh `cancelled()` per frame would take the token's lock, shared by every
    // member, on each delivery.
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let due = publishing.as_ref().and_then(Publishing::next_due);
        tokio::select! {
            _ = &mut stopped => break,
            changed = windows.changed(), if publishing.is_some() => {
                if changed.is_err() {
                    break;
                }
                let window = *windows.borrow_and_update();
                if let (Some(w), Some(p), Some(slot)) = (window, publishing.as_mut(), spec.publisher) {
                    p.start(&w, slot, shared);
                }
            }
            _ = sleep_until_opt(due), if due.is_some() => {
                if let Some(p) = publishing.as_mut()
                    && let Err(reason) = send_due(&mut ws, p, &ctx).await
                {
                    result.disconnected = Some(reason);
                    break;
                }
            }
            item = ws.next() => {
                let text = match item {
                    Some(Ok(Message::Text(text))) => text,
                    other => match client::end_reason(other) {
                        Some(reason) => {
                            result.disconnected = Some(reason);
                            break;
                        }
                        None => continue,
                    },
                };
                match Incoming::parse(protocol, text.as_str()) {
                    Some(Incoming::Message { room, offset, sender, data })
                        if room == Some(room_name.as_str()) =>
                    {
                        tracker.on_message(offset, sender, data, shared);
                    }
                    Some(Incoming::Reply { id, ok, offset, code }) => {
                        if let Some(p) = publishing.as_mut()
                            && on_reply(id, ok, code, p, spec.room, shared)
                            && let Some(offset) = offset
                        {
                            tracker.on_own_publish(offset);
                        }
                    }
                    Some(Incoming::Ping) => {
                        if let Err(e) = ws.send(Message::text("3")).await {
                            result.disconnected = Some(client::ws_reason(&e));
                            break;
                        }
                    }
                    _ => {}
                }
            }
        }
        if let Some(p) = publishing.as_mut() {
            p.check_done(shared);
        }
    }
    if result.disconnected.is_some() {
        shared.disconnects.fetch_add(1, SeqCst);
    }
    if let Some(p) = publishing.as_mut() {
        // Ended (disconnected, or the run stopped): nothing more will come from it.
        p.mark_done(shared);
        shared.publishers_gone.fetch_add(1, SeqCst);
    }
    result.deliveries = tracker.finish();
    // Best effort: a close frame lets the server clean up at once; it is not awaited long.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), ws.close(None)).await;
    result
}

/// Sends every publish that is due, then flushes once.
async fn send_due(ws: &mut Ws, p: &mut Publishing, ctx: &Ctx) -> Result<(), String> {
    let now = Instant::now();
    let mut n = 0u64;
    let protocol = ctx.dialer.protocol();
    while let Some(due) = p.next_due() {
        if due > now {
            break;
        }
        let frame = p.frame(protocol, &ctx.filler, ctx.tag_steps);
        ws.feed(Message::text(frame))
            .await
            .map_err(|e| client::ws_reason(&e))?;
        p.pacer.advance();
        n += 1;
    }
    ctx.shared.sent.fetch_add(n, Relaxed);
    if let Some(st) = ctx.shared.step(p.step) {
        st.sent.fetch_add(n, Relaxed);
    }
    ws.flush().await.map_err(|e| client::ws_reason(&e))
}

/// Matches a reply to its publish; true for a publish acknowledged.
fn on_reply(
    id: u64,
    ok: bool,
    code: Option<&str>,
    p: &mut Publishing,
    room: usize,
    shared: &Shared,
) -> bool {
    let Some((sent_at, step)) = p.pending.remove(&id) else {
        return false;
    };
    if step == p.step {
        p.pending_in_step = p.pending_in_step.saturating_sub(1);
    }
    let st = shared.step(step);
    if ok {
        shared.acked.fetch_add(1, Relaxed);
        if let Some(st) = st {
            st.acked.fetch_add(1, Relaxed);
            st.acked_per_room[room].fetch_add(1, Relaxed);
            st.ack_latency
                .record(id, unix_ns().saturating_sub(sent_at) / 1000);
        }
        true
    } else {
        if let Some(st) = st {
            st.error(code.unwrap_or("error"));
        }
        false
    }
}

async fn sleep_until_opt(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deliver(t: &mut Tracker, shared: &Shared, offset: u64, sender: &str, seq: u64) {
        let data = format!(r#"{{"t":{},"q":{seq},"p":"x"}}"#, unix_ns());
        let raw = serde_json::value::RawValue::from_string(data).unwrap();
        t.on_message(Some(offset), Some(sender), Some(&raw), shared);
    }

    fn shared_with_step() -> Shared {
        let shared = Shared::new(1, 1);
        shared.open_step(0);
        shared
    }

    #[test]
    fn counts_gaps_disorder_and_publisher_order() {
        let shared = shared_with_step();
        let mut t = Tracker::new(0, 10);
        for (offset, seq) in [(11, 1), (12, 2), (14, 4), (13, 3), (14, 5), (15, 6)] {
            deliver(&mut t, &shared, offset, "c1", seq);
        }
        deliver(&mut t, &shared, 16, "c2", 9);
        deliver(&mut t, &shared, 17, "c2", 8);
        let s = t.finish();
        assert_eq!(s.received, 8);
        // 13 after 14, and 14 again.
        assert_eq!(s.out_of_order, 2);
        // 13 was skipped when 14 came.
        assert_eq!(s.gaps, 1);
        // c1: 3 after 4; c2: 8 after 9.
        assert_eq!(s.order_violations, 2);
        assert_eq!(shared.received.load(SeqCst), 8);
        let st = shared.step(0).unwrap();
        assert_eq!(st.latency.snapshot().len(), 8);
        assert_eq!(st.received.load(SeqCst), 8);
        assert_eq!(st.out_of_order.load(SeqCst), 2);
    }

    #[test]
    fn a_publishers_own_offsets_are_no_gaps() {
        let shared = shared_with_step();
        let mut t = Tracker::new(0, 0);
        // Room-mate's messages 2 and 4; own publishes got 1, 3 and 5, one reply late.
        t.on_own_publish(1);
        deliver(&mut t, &shared, 2, "other", 1);
        deliver(&mut t, &shared, 4, "other", 2);
        t.on_own_publish(3);
        t.on_own_publish(5);
        assert_eq!(t.finish().gaps, 0);

        let mut t = Tracker::new(0, 0);
        t.on_own_publish(1);
        t.on_own_publish(3);
        deliver(&mut t, &shared, 2, "other", 1);
        deliver(&mut t, &shared, 6, "other", 2);
        // 4 and 5 never came.
        assert_eq!(t.finish().gaps, 2);
    }

    #[test]
    fn deliveries_count_in_their_steps() {
        let shared = Shared::new(1, 2);
        shared.open_step(0);
        shared.open_step(1);
        let mut t = Tracker::new(0, 0);
        for (offset, step) in [(1, 0), (2, 0), (3, 1)] {
            let data = format!(r#"{{"t":{},"q":{offset},"s":{step},"p":""}}"#, unix_ns());
            let raw = serde_json::value::RawValue::from_string(data).unwrap();
            t.on_message(Some(offset), Some("c"), Some(&raw), &shared);
        }
        assert_eq!(shared.step(0).unwrap().received.load(SeqCst), 2);
        assert_eq!(shared.step(1).unwrap().received.load(SeqCst), 1);
    }
}
