//! One WebSocket member of a room: connects, joins, then counts and checks what the room
//! delivers. A publisher is a member too (it receives its room-mates' messages) that also
//! publishes on an open-loop schedule, without waiting for each reply: replies are matched to
//! their publish by id.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Frame, Payload, Ws};
use crate::report::{Reasons, Samples};
use crate::scenarios::delivery::{Ctx, Shared};
use crate::scenarios::{Pacer, unix_ns};

/// Who a member is.
#[derive(Debug, Clone, Copy)]
pub struct MemberSpec {
    /// Connection number (the token's user is `load-<n>`).
    pub n: u64,
    pub room: usize,
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
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    pub publish_errors: Reasons,
}

#[derive(Debug, Default, Clone)]
pub struct DeliveryStats {
    pub received: u64,
    pub out_of_order: u64,
    pub gaps: u64,
    pub order_violations: u64,
    pub last_delivery: Option<Instant>,
}

/// Checks one member's deliveries in its room: offsets must rise, each publisher's sequence
/// numbers too; publish-to-delivery latency goes to the shared histogram in batches.
pub struct Tracker {
    join_offset: u64,
    last_offset: u64,
    /// This member's own acknowledged publishes: offsets it is never sent.
    own_count: u64,
    own_max: u64,
    last_seq: HashMap<String, u64>,
    samples: Samples,
    pub stats: DeliveryStats,
}

impl Tracker {
    /// Offsets above `join_offset` are the ones this member should get.
    pub fn new(join_offset: u64) -> Tracker {
        Tracker {
            join_offset,
            last_offset: join_offset,
            own_count: 0,
            own_max: 0,
            last_seq: HashMap::new(),
            samples: Samples::new(),
            stats: DeliveryStats::default(),
        }
    }

    pub fn on_message(&mut self, frame: &Frame<'_>, shared: &Shared) {
        let Some(offset) = frame.offset else { return };
        let now = unix_ns();
        self.stats.received += 1;
        self.stats.last_delivery = Some(Instant::now());
        shared.received.fetch_add(1, Relaxed);
        if offset <= self.last_offset {
            self.stats.out_of_order += 1;
        } else {
            self.stats.gaps += offset - self.last_offset - 1;
            self.last_offset = offset;
        }
        let Some(payload) = frame
            .data
            .and_then(|d| serde_json::from_str::<Payload>(d.get()).ok())
        else {
            return;
        };
        self.samples
            .push(now.saturating_sub(payload.t) / 1000, &shared.latency);
        let sender = frame.client_id.unwrap_or("");
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

    pub fn finish(&mut self, shared: &Shared) -> DeliveryStats {
        self.samples.flush(&shared.latency);
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

/// A publisher's state once the run has started.
struct Publishing {
    pacer: Pacer,
    end: Instant,
    /// `{"type":"publish","room":"…","id":` — the rest is appended per message.
    prefix: String,
    seq: u64,
    /// Publish id → send time (Unix ns), until its reply arrives.
    pending: HashMap<u64, u64>,
    ack_samples: Samples,
}

impl Publishing {
    /// When the next publish is due, if the schedule still has one.
    fn next_due(&self) -> Option<Instant> {
        let due = self.pacer.due();
        (due < self.end).then_some(due)
    }

    fn finished(&self) -> bool {
        self.next_due().is_none() && self.pending.is_empty()
    }

    fn frame(&mut self, filler: &str) -> String {
        self.seq += 1;
        let t = unix_ns();
        self.pending.insert(self.seq, t);
        let mut s = String::with_capacity(self.prefix.len() + filler.len() + 64);
        s.push_str(&self.prefix);
        s.push_str(&format!(
            "{seq},\"data\":{{\"t\":{t},\"q\":{seq},\"p\":\"",
            seq = self.seq
        ));
        s.push_str(filler);
        s.push_str("\"}}");
        s
    }
}

/// Runs one member until the run stops (or its connection ends). `permit` bounds the
/// handshakes in flight and is released once joined.
pub async fn run(ctx: Arc<Ctx>, spec: MemberSpec, permit: OwnedSemaphorePermit) -> MemberResult {
    let shared = &ctx.shared;
    let mut result = MemberResult {
        room: spec.room,
        ..MemberResult::default()
    };
    let room_name = &ctx.rooms[spec.room];
    let setup = async {
        let c = ctx.dialer.connect(spec.n).await?;
        let mut ws = c.ws;
        let offset = client::join(&mut ws, room_name, ctx.join_timeout).await?;
        Ok::<_, String>((ws, offset))
    }
    .await;
    drop(permit);
    let (mut ws, join_offset) = match setup {
        Ok(v) => {
            shared.joined_per_room[spec.room].fetch_add(1, SeqCst);
            shared.setup_resolved.fetch_add(1, SeqCst);
            v
        }
        Err(reason) => {
            if spec.publisher.is_some() {
                // It will publish nothing: the drain must not wait for it.
                shared.publishers_done.fetch_add(1, SeqCst);
            }
            shared.setup_resolved.fetch_add(1, SeqCst);
            result.setup_failure = Some(reason);
            return result;
        }
    };

    let mut tracker = Tracker::new(join_offset);
    let mut publishing: Option<Publishing> = None;
    let mut start = ctx.start.clone();
    let mut done_reported = false;
    let mut waiting_start = spec.publisher.is_some();
    // Made once: a fresh `cancelled()` per frame would take the token's lock, shared by every
    // member, on each delivery.
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let due = publishing.as_ref().and_then(Publishing::next_due);
        tokio::select! {
            _ = &mut stopped => break,
            window = async { start.wait_for(Option::is_some).await.ok().and_then(|w| *w) },
                if waiting_start =>
            {
                waiting_start = false;
                let Some((begin, end)) = window else { break };
                let slot = spec.publisher.unwrap_or(PublisherSlot { index: 0, count: 1 });
                publishing = Some(start_publishing(&ctx, room_name, slot, begin, end));
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
                let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else {
                    continue;
                };
                match frame.kind {
                    "message" if frame.room == Some(room_name.as_str()) => {
                        tracker.on_message(&frame, shared);
                    }
                    "published" | "error" => {
                        if let Some(p) = publishing.as_mut()
                            && on_reply(&frame, p, spec.room, shared, &mut result)
                            && let Some(offset) = frame.offset
                        {
                            tracker.on_own_publish(offset);
                        }
                    }
                    _ => {}
                }
            }
        }
        if !done_reported && publishing.as_ref().is_some_and(Publishing::finished) {
            done_reported = true;
            shared.publishers_done.fetch_add(1, SeqCst);
        }
    }
    if spec.publisher.is_some() && !done_reported {
        // Ended early (disconnected, or the run stopped): nothing more will come from it.
        shared.publishers_done.fetch_add(1, SeqCst);
    }
    result.deliveries = tracker.finish(shared);
    if let Some(mut p) = publishing {
        p.ack_samples.flush(&shared.ack_latency);
        result.sent = p.seq;
        result.unacked = p.pending.len() as u64;
    }
    // Best effort: a close frame lets the gateway clean up at once; it is not awaited long.
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), ws.close(None)).await;
    result
}

fn start_publishing(
    ctx: &Ctx,
    room: &str,
    slot: PublisherSlot,
    begin: Instant,
    end: Instant,
) -> Publishing {
    // Publisher i of P sends every P / rate seconds, shifted by i / rate so the publishers
    // interleave instead of firing together.
    let rate = ctx.rate / f64::from(slot.count);
    let phase = std::time::Duration::from_secs_f64(f64::from(slot.index) / ctx.rate);
    let room_json = serde_json::to_string(room).unwrap_or_default();
    Publishing {
        pacer: Pacer::new(begin + phase, rate),
        end,
        prefix: format!("{{\"type\":\"publish\",\"room\":{room_json},\"id\":"),
        seq: 0,
        pending: HashMap::new(),
        ack_samples: Samples::new(),
    }
}

/// Sends every publish that is due, then flushes once.
async fn send_due(ws: &mut Ws, p: &mut Publishing, ctx: &Ctx) -> Result<(), String> {
    let now = Instant::now();
    let mut n = 0u64;
    while let Some(due) = p.next_due() {
        if due > now {
            break;
        }
        let frame = p.frame(&ctx.filler);
        ws.feed(Message::text(frame))
            .await
            .map_err(|e| client::ws_reason(&e))?;
        p.pacer.advance();
        n += 1;
    }
    ctx.shared.sent.fetch_add(n, Relaxed);
    ws.flush().await.map_err(|e| client::ws_reason(&e))
}

/// Matches a `published` or `error` reply to its publish; true for a publish acknowledged.
fn on_reply(
    frame: &Frame<'_>,
    p: &mut Publishing,
    room: usize,
    shared: &Shared,
    result: &mut MemberResult,
) -> bool {
    let Some(sent_at) = frame.id.and_then(|id| p.pending.remove(&id)) else {
        return false;
    };
    if frame.kind == "published" {
        result.acked += 1;
        shared.acked.fetch_add(1, Relaxed);
        shared.acked_per_room[room].fetch_add(1, Relaxed);
        p.ack_samples.push(
            unix_ns().saturating_sub(sent_at) / 1000,
            &shared.ack_latency,
        );
        true
    } else {
        *result
            .publish_errors
            .entry(frame.code.unwrap_or("error").to_owned())
            .or_default() += 1;
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
        let text = format!(
            r#"{{"type":"message","room":"r","offset":{offset},"epoch":"e","user":"u","clientId":"{sender}","data":{{"t":{},"q":{seq},"p":"x"}}}}"#,
            unix_ns()
        );
        let frame: Frame<'_> = serde_json::from_str(&text).unwrap();
        t.on_message(&frame, shared);
    }

    #[test]
    fn counts_gaps_disorder_and_publisher_order() {
        let shared = Shared::new(1);
        let mut t = Tracker::new(10);
        for (offset, seq) in [(11, 1), (12, 2), (14, 4), (13, 3), (14, 5), (15, 6)] {
            deliver(&mut t, &shared, offset, "c1", seq);
        }
        deliver(&mut t, &shared, 16, "c2", 9);
        deliver(&mut t, &shared, 17, "c2", 8);
        let s = t.finish(&shared);
        assert_eq!(s.received, 8);
        // 13 after 14, and 14 again.
        assert_eq!(s.out_of_order, 2);
        // 13 was skipped when 14 came.
        assert_eq!(s.gaps, 1);
        // c1: 3 after 4; c2: 8 after 9.
        assert_eq!(s.order_violations, 2);
        assert_eq!(shared.received.load(SeqCst), 8);
        assert_eq!(shared.latency.snapshot().len(), 8);
    }

    #[test]
    fn a_publishers_own_offsets_are_no_gaps() {
        let shared = Shared::new(1);
        let mut t = Tracker::new(0);
        // Room-mate's messages 2 and 4; own publishes got 1, 3 and 5, one reply late.
        t.on_own_publish(1);
        deliver(&mut t, &shared, 2, "other", 1);
        deliver(&mut t, &shared, 4, "other", 2);
        t.on_own_publish(3);
        t.on_own_publish(5);
        assert_eq!(t.finish(&shared).gaps, 0);

        let mut t = Tracker::new(0);
        t.on_own_publish(1);
        t.on_own_publish(3);
        deliver(&mut t, &shared, 2, "other", 1);
        deliver(&mut t, &shared, 6, "other", 2);
        // 4 and 5 never came.
        assert_eq!(t.finish(&shared).gaps, 2);
    }
}
