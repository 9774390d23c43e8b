'use strict';
// Fan-out load client for the Socket.IO reference server (server.js): the same scenario as
// Roomcast's `loadgen fanout`, with the same JSON field names where they mean the same thing.
//
//   node loadgen.js --url http://127.0.0.1:7600,http://127.0.0.1:7601 --secret S \
//     --subscribers 1000 --rooms 1 --publishers 4 --rate 200 --payload 100 --duration 10s --json
//
// S subscribers spread round-robin over R fresh rooms; P publishers (default one per room, each
// joins its room) publish at a total --rate, open loop: publish k of publisher i is due at
// start + i*period/P + k*period whether or not earlier ones were acknowledged. data is
// {"t": send time (us, monotonic clock shared by every thread of this process), "q": publisher
// sequence number, "w": publisher index, "p": filler of --payload bytes}. Latency = delivery
// time - t, every sample kept; percentiles are exact order statistics over all samples.
// Expected deliveries = sum over acknowledged publishes of (members of the room - the sender).
// Socket.IO has no room offsets, so ordering is checked per publisher: `out_of_order` counts
// deliveries whose sequence number is not above the last one seen from that publisher by that
// member (`publisher_order_violations` is the same count), `gaps` the sequence numbers skipped.
//
// Members live in --workers worker threads (default 2); publishers in one more. Loopback only;
// the run stops by itself (hard bound: set-up bound + duration + drain + 30 s).

const { Worker, isMainThread, parentPort, workerData } = require('node:worker_threads');

const nowUs = () => Number(process.hrtime.bigint() / 1000n);

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

const USAGE = `Usage: node loadgen.js [options]   (fan-out against the Socket.IO reference server)

  --url URL            server URL(s), repeat or comma-separate; loopback only [http://127.0.0.1:7600]
  --secret S           HS256 secret; one token per connection, sub = load-<n> [env JWT_SECRET]
  --subscribers N      subscribers, round-robin over the rooms [100]
  --rooms N            rooms [1]
  --publishers N       publisher connections (each joins its room, round-robin) [one per room]
  --rate R             total publishes per second over all publishers [100]
  --payload B          filler bytes in each message's data [100]
  --duration D         how long to publish: 500ms, 10s, 2m or seconds [10s]
  --drain D            wait at most this long after publishing for acks and deliveries [5s]
  --connect-rate N     connections opened per second during set-up, 0 = unpaced [2000]
  --concurrency N      handshakes in flight at once, over all workers [100]
  --connect-timeout D  give up on one connection (connect + join) after this long [10s]
  --source-ips N       bind client sockets to 127.0.0.1 ..= 127.0.0.N, round-robin [8]
  --workers N          worker threads holding the members [2]
  --room-prefix P      room names are <P>-<run id>-<n> [loadgen]
  --json               print only the final JSON object
  -h, --help`;

function fail(msg) {
  process.stderr.write(`error: ${msg}\n\n${USAGE}\n`);
  process.exit(2);
}

function parseDuration(name, s) {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m)?$/.exec(String(s).trim());
  if (!m) fail(`${name}: '${s}' is not a duration (500ms, 10s, 2m or plain seconds)`);
  const v = Number(m[1]);
  return m[2] === 'ms' ? v / 1000 : m[2] === 'm' ? v * 60 : v;
}

function parseIntArg(name, s, min) {
  if (!/^\d+$/.test(String(s))) fail(`${name}: '${s}' is not a non-negative integer`);
  const v = Number(s);
  if (v < min) fail(`${name}: must be at least ${min}`);
  return v;
}

function isLoopback(u) {
  let url;
  try {
    url = new URL(u);
  } catch {
    fail(`--url: '${u}' is not a URL`);
  }
  if (!['http:', 'https:', 'ws:', 'wss:'].includes(url.protocol)) fail(`--url: '${u}': use http:// or ws://`);
  const h = url.hostname.replace(/^\[|\]$/g, '');
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h);
}

function parseArgs(argv) {
  const o = {
    urls: [],
    secret: process.env.JWT_SECRET,
    subscribers: 100,
    rooms: 1,
    publishers: null,
    rate: 100,
    payload: 100,
    duration: 10,
    drain: 5,
    connectRate: 2000,
    concurrency: 100,
    connectTimeout: 10,
    sourceIps: 8,
    workers: 2,
    roomPrefix: 'loadgen',
    json: false,
  };
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    let v;
    const eq = a.indexOf('=');
    if (a.startsWith('--') && eq > 0) {
      v = a.slice(eq + 1);
      a = a.slice(0, eq);
    }
    const val = () => {
      if (v !== undefined) return v;
      if (i + 1 >= argv.length) fail(`${a} needs a value`);
      return argv[++i];
    };
    switch (a) {
      case '-h':
      case '--help':
        process.stdout.write(USAGE + '\n');
        process.exit(0);
        break;
      case '--url': o.urls.push(...val().split(',').filter(Boolean)); break;
      case '--secret': o.secret = val(); break;
      case '--subscribers': o.subscribers = parseIntArg(a, val(), 0); break;
      case '--rooms': o.rooms = parseIntArg(a, val(), 1); break;
      case '--publishers': o.publishers = parseIntArg(a, val(), 1); break;
      case '--rate': {
        const s = val();
        if (!/^\d+(\.\d+)?$/.test(s) || Number(s) <= 0) fail(`--rate: '${s}' is not a positive number`);
        o.rate = Number(s);
        break;
      }
      case '--payload': o.payload = parseIntArg(a, val(), 0); break;
      case '--duration': o.duration = parseDuration(a, val()); break;
      case '--drain': o.drain = parseDuration(a, val()); break;
      case '--connect-rate': o.connectRate = parseIntArg(a, val(), 0); break;
      case '--concurrency': o.concurrency = parseIntArg(a, val(), 1); break;
      case '--connect-timeout': o.connectTimeout = parseDuration(a, val()); break;
      case '--source-ips': o.sourceIps = parseIntArg(a, val(), 1); break;
      case '--workers': o.workers = parseIntArg(a, val(), 1); break;
      case '--room-prefix': o.roomPrefix = val(); break;
      case '--json': o.json = true; break;
      default: fail(`unknown argument '${a}'`);
    }
  }
  if (o.urls.length === 0) o.urls.push('http://127.0.0.1:7600');
  for (const u of o.urls) if (!isLoopback(u)) fail(`--url: '${u}' is not a loopback address`);
  if (!o.secret) fail('--secret (or JWT_SECRET) is required');
  if (o.publishers === null) o.publishers = o.rooms;
  if (o.duration <= 0) fail('--duration must be positive');
  if (o.sourceIps > 254) fail('--source-ips: at most 254');
  o.urls = o.urls.map((u) => u.replace(/^ws/, 'http'));
  return o;
}

// ---------------------------------------------------------------------------------------------
// Worker side: connect members, record deliveries, publish
// ---------------------------------------------------------------------------------------------

class Samples {
  constructor() {
    this.buf = new Float64Array(1 << 16);
    this.n = 0;
  }
  push(v) {
    if (this.n === this.buf.length) {
      const b = new Float64Array(this.buf.length * 2);
      b.set(this.buf);
      this.buf = b;
    }
    this.buf[this.n++] = v;
  }
  take() {
    return this.buf.slice(0, this.n);
  }
}

function workerMain() {
  const { io } = require('socket.io-client');
  const jwt = require('jsonwebtoken');
  const w = workerData; // { role, members: [{n, url, room, roomIdx, pubIdx}], opts, ... }
  const opts = w.opts;
  const sockets = [];
  const latency = new Samples();
  const ackLatency = new Samples();
  const receivedPerRoom = new Array(opts.rooms).fill(0);
  const disconnected = {};
  let received = 0;
  let outOfOrder = 0;
  let gaps = 0;
  let lastDeliveryUs = 0;
  let finishing = false;

  function connectOne(m) {
    return new Promise((resolve) => {
      const token = jwt.sign({ sub: `load-${m.n}`, exp: Math.floor(Date.now() / 1000) + 3600 }, opts.secret, {
        algorithm: 'HS256',
      });
      const socket = io(m.url, {
        transports: ['websocket'],
        auth: { token },
        reconnection: false,
        forceNew: true,
        timeout: opts.connectTimeout * 1000,
        localAddress: `127.0.0.${1 + (m.n % opts.sourceIps)}`,
      });
      let done = false;
      let member = false;
      const finish = (err) => {
        if (done) return;
        done = true;
        member = !err;
        clearTimeout(timer);
        if (err) socket.close();
        resolve(err ? { err } : { socket });
      };
      const timer = setTimeout(() => finish('timeout'), opts.connectTimeout * 1000);
      socket.on('connect_error', (e) => finish(reason(e)));
      socket.on('connect', () => {
        socket.emit('join', m.room, (ack) => {
          if (ack && ack.ok) finish(null);
          else finish(`join_${(ack && ack.error) || 'failed'}`);
        });
      });
      // Per member, per publisher: last sequence number seen.
      const last = new Float64Array(opts.publishers).fill(-1);
      socket.on('message', (msg) => {
        const t = nowUs();
        const d = msg.data;
        latency.push((t - d.t) / 1000);
        received++;
        receivedPerRoom[m.roomIdx]++;
        lastDeliveryUs = t;
        const prev = last[d.w];
        if (d.q <= prev) outOfOrder++;
        else {
          if (d.q > prev + 1) gaps += d.q - prev - 1;
          last[d.w] = d.q;
        }
      });
      socket.on('disconnect', (why) => {
        if (member && !finishing) disconnected[why] = (disconnected[why] || 0) + 1;
      });
    });
  }

  function reason(e) {
    const msg = String((e && e.message) || e);
    if (/unauthorized/i.test(msg)) return 'unauthorized';
    if (/ECONNREFUSED/.test(msg) || /xhr poll|websocket error/i.test(msg)) return 'connection_refused';
    if (/timeout/i.test(msg)) return 'timeout';
    return msg.replace(/[^a-zA-Z0-9]+/g, '_').slice(0, 40);
  }

  async function setup() {
    const failures = {};
    const members = w.members;
    const conc = Math.max(1, w.concurrency);
    const interval = w.connectRate > 0 ? 1000 / w.connectRate : 0;
    const start = Date.now();
    let next = 0;
    let joined = 0;
    const results = new Array(members.length);
    async function lane() {
      for (;;) {
        const i = next++;
        if (i >= members.length) return;
        if (interval > 0) {
          const due = start + i * interval;
          const wait = due - Date.now();
          if (wait > 0) await new Promise((r) => setTimeout(r, wait));
        }
        const r = await connectOne(members[i]);
        results[i] = r;
        if (r.err) failures[r.err] = (failures[r.err] || 0) + 1;
        else {
          joined++;
          sockets[i] = r.socket;
        }
      }
    }
    await Promise.all(Array.from({ length: Math.min(conc, members.length) }, lane));
    const joinedPerRoom = new Array(opts.rooms).fill(0);
    members.forEach((m, i) => {
      if (results[i] && !results[i].err) joinedPerRoom[m.roomIdx]++;
    });
    return { joined, failures, joinedPerRoom };
  }

  // Publisher lanes (only in the publisher worker).
  const pub = { sent: 0, published: 0, errors: {}, perRoomAcked: new Array(opts.rooms).fill(0), firstUs: 0, endUs: 0 };
  function publish(startUs) {
    const P = w.members.length;
    const period = (1e6 * P) / opts.rate; // us between two publishes of one publisher
    const endUs = startUs + opts.duration * 1e6;
    const filler = 'x'.repeat(opts.payload);
    const seq = new Array(P).fill(0);
    const lanes = w.members.map((m, i) => ({ m, i, socket: sockets[i], nextUs: startUs + (i * period) / P }));
    pub.firstUs = startUs;
    return new Promise((resolve) => {
      const tick = () => {
        const now = nowUs();
        let soonest = Infinity;
        for (const l of lanes) {
          while (l.nextUs <= now && l.nextUs < endUs) {
            if (l.socket) {
              const q = seq[l.i]++;
              const t = nowUs();
              pub.sent++;
              l.socket.emit('publish', { room: l.m.room, data: { t, q, w: l.m.pubIdx, p: filler } }, (ack) => {
                if (ack && ack.ok) {
                  pub.published++;
                  pub.perRoomAcked[l.m.roomIdx]++;
                  ackLatency.push((nowUs() - t) / 1000);
                } else {
                  const e = (ack && ack.error) || 'unknown';
                  pub.errors[e] = (pub.errors[e] || 0) + 1;
                }
              });
            }
            l.nextUs += period;
          }
          if (l.nextUs < endUs) soonest = Math.min(soonest, l.nextUs);
        }
        if (soonest === Infinity) {
          pub.endUs = nowUs();
          resolve();
          return;
        }
        setTimeout(tick, Math.max(0, (soonest - nowUs()) / 1000 - 0.5));
      };
      const wait = (startUs - nowUs()) / 1000;
      setTimeout(tick, Math.max(0, wait));
    });
  }

  let reporter = null;
  parentPort.on('message', async (cmd) => {
    if (cmd.type === 'setup') {
      const r = await setup();
      parentPort.postMessage({ type: 'ready', ...r });
      reporter = setInterval(() => {
        const answered = pub.published + Object.values(pub.errors).reduce((a, b) => a + b, 0);
        parentPort.postMessage({ type: 'progress', received, published: pub.published, answered, perRoomAcked: pub.perRoomAcked });
      }, 100);
    } else if (cmd.type === 'publish') {
      await publish(cmd.startUs);
      parentPort.postMessage({ type: 'published', sent: pub.sent, published: pub.published, perRoomAcked: pub.perRoomAcked, endUs: pub.endUs });
    } else if (cmd.type === 'finish') {
      finishing = true;
      clearInterval(reporter);
      const lat = latency.take();
      const ack = ackLatency.take();
      const out = {
        type: 'result',
        received,
        receivedPerRoom,
        outOfOrder,
        gaps,
        lastDeliveryUs,
        disconnected,
        sent: pub.sent,
        published: pub.published,
        perRoomAcked: pub.perRoomAcked,
        publishErrors: pub.errors,
        latency: lat,
        ackLatency: ack,
      };
      for (const s of sockets) if (s) s.close();
      parentPort.postMessage(out, [lat.buffer, ack.buffer]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Main thread: orchestrate, merge, report
// ---------------------------------------------------------------------------------------------

function stats(samples) {
  const n = samples.length;
  if (n === 0) return { count: 0, mean: null, p50: null, p90: null, p99: null, p999: null, max: null };
  samples.sort();
  let sum = 0;
  for (let i = 0; i < n; i++) sum += samples[i];
  const q = (p) => samples[Math.min(n - 1, Math.max(0, Math.ceil(p * n) - 1))];
  const r = (x) => Math.round(x * 1000) / 1000;
  return { count: n, mean: r(sum / n), p50: r(q(0.5)), p90: r(q(0.9)), p99: r(q(0.99)), p999: r(q(0.999)), max: r(samples[n - 1]) };
}

function concat(arrays) {
  let n = 0;
  for (const a of arrays) n += a.length;
  const out = new Float64Array(n);
  let o = 0;
  for (const a of arrays) {
    out.set(a, o);
    o += a.length;
  }
  return out;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const setupBound = opts.connectTimeout + (opts.connectRate > 0 ? (opts.subscribers + opts.publishers) / opts.connectRate : 0) + 30;
  const hardBound = setupBound + opts.duration + opts.drain + 30;
  const killer = setTimeout(() => {
    process.stderr.write(`loadgen: hard time bound (${hardBound.toFixed(0)} s) reached, exiting\n`);
    process.exit(1);
  }, hardBound * 1000);
  killer.unref();

  const runId = Math.random().toString(16).slice(2, 10);
  const rooms = Array.from({ length: opts.rooms }, (_, i) => `${opts.roomPrefix}-${runId}-${i}`);
  const U = opts.urls.length;
  const nWorkers = Math.max(1, Math.min(opts.workers, opts.subscribers || 1));
  const subShares = Array.from({ length: nWorkers }, () => []);
  for (let i = 0; i < opts.subscribers; i++) {
    subShares[i % nWorkers].push({ n: i, url: opts.urls[i % U], room: rooms[i % opts.rooms], roomIdx: i % opts.rooms });
  }
  const pubMembers = [];
  for (let j = 0; j < opts.publishers; j++) {
    const n = opts.subscribers + j;
    pubMembers.push({ n, url: opts.urls[n % U], room: rooms[j % opts.rooms], roomIdx: j % opts.rooms, pubIdx: j });
  }
  const shares = [...subShares.map((m) => ({ role: 'sub', members: m })), { role: 'pub', members: pubMembers }];
  const totalMembers = opts.subscribers + opts.publishers;
  const workers = shares.map((s) => {
    const frac = s.members.length / Math.max(1, totalMembers);
    return new Worker(__filename, {
      workerData: {
        role: s.role,
        members: s.members,
        opts,
        concurrency: Math.max(1, Math.round(opts.concurrency * frac)),
        connectRate: opts.connectRate > 0 ? Math.max(1, opts.connectRate * frac) : 0,
      },
    });
  });
  const pubWorker = workers[workers.length - 1];
  const progress = workers.map(() => ({ received: 0 }));
  let pubProgress = { published: 0, answered: 0, perRoomAcked: new Array(opts.rooms).fill(0) };
  const waiters = new Map();
  const expectOne = (w, type) => new Promise((resolve) => waiters.set(`${workers.indexOf(w)}:${type}`, resolve));
  workers.forEach((w, i) => {
    w.on('message', (m) => {
      if (m.type === 'progress') {
        progress[i].received = m.received;
        if (w === pubWorker) pubProgress = m;
      }
      const k = `${i}:${m.type}`;
      if (waiters.has(k)) {
        const r = waiters.get(k);
        waiters.delete(k);
        r(m);
      }
    });
    w.on('error', (e) => {
      process.stderr.write(`loadgen: worker ${i} died: ${e.stack || e}\n`);
      process.exit(1);
    });
  });

  // Set-up: subscribers first, then publishers (as Roomcast's loadgen does).
  const t0 = Date.now();
  const subReady = await Promise.all(workers.slice(0, -1).map((w) => {
    const p = expectOne(w, 'ready');
    w.postMessage({ type: 'setup' });
    return p;
  }));
  const pubReadyP = expectOne(pubWorker, 'ready');
  pubWorker.postMessage({ type: 'setup' });
  const pubReady = await pubReadyP;
  const ready = [...subReady, pubReady];
  const setupSeconds = (Date.now() - t0) / 1000;
  const setupFailures = {};
  const joinedPerRoom = new Array(opts.rooms).fill(0);
  let members = 0;
  for (const r of ready) {
    members += r.joined;
    for (const [k, v] of Object.entries(r.failures)) setupFailures[k] = (setupFailures[k] || 0) + v;
    r.joinedPerRoom.forEach((v, i) => (joinedPerRoom[i] += v));
  }
  if (pubReady.joined === 0) {
    process.stderr.write(`loadgen: no publisher could join (${JSON.stringify(setupFailures)})\n`);
    process.exit(1);
  }

  // Publish.
  const startUs = nowUs() + 200_000;
  const publishedP = expectOne(pubWorker, 'published');
  pubWorker.postMessage({ type: 'publish', startUs });
  const pubDone = await publishedP;
  const publishSeconds = (pubDone.endUs - startUs) / 1e6;

  // Drain: until every acknowledged publish's deliveries arrived and every publish is answered,
  // or --drain ran out.
  const drainStart = Date.now();
  const expectedNow = () => pubProgress.perRoomAcked.reduce((s, a, i) => s + a * Math.max(0, joinedPerRoom[i] - 1), 0);
  await new Promise((resolve) => {
    const check = () => {
      const rec = progress.reduce((s, p) => s + p.received, 0);
      const allAcked = pubProgress.answered >= pubDone.sent;
      if ((allAcked && rec >= expectedNow()) || Date.now() - drainStart >= opts.drain * 1000) resolve();
      else setTimeout(check, 50);
    };
    setTimeout(check, 150);
  });
  const drainSeconds = (Date.now() - drainStart) / 1000;

  const results = await Promise.all(workers.map((w) => {
    const p = expectOne(w, 'result');
    w.postMessage({ type: 'finish' });
    return p;
  }));
  const pr = results[results.length - 1];
  let received = 0;
  let outOfOrder = 0;
  let gaps = 0;
  let lastDeliveryUs = 0;
  const disconnected = {};
  const receivedPerRoom = new Array(opts.rooms).fill(0);
  for (const r of results) {
    received += r.received;
    outOfOrder += r.outOfOrder;
    gaps += r.gaps;
    lastDeliveryUs = Math.max(lastDeliveryUs, r.lastDeliveryUs);
    r.receivedPerRoom.forEach((v, i) => (receivedPerRoom[i] += v));
    for (const [k, v] of Object.entries(r.disconnected)) disconnected[k] = (disconnected[k] || 0) + v;
  }
  const expected = pr.perRoomAcked.reduce((s, a, i) => s + a * Math.max(0, joinedPerRoom[i] - 1), 0);
  const deliverySeconds = Math.max(publishSeconds, (lastDeliveryUs - startUs) / 1e6);
  const latency = stats(concat(results.map((r) => r.latency)));
  const ackLatency = stats(pr.ackLatency);
  const round = (x, d = 3) => Math.round(x * 10 ** d) / 10 ** d;
  const report = {
    scenario: 'fanout',
    server: 'socket.io',
    urls: opts.urls,
    rooms: opts.rooms,
    subscribers: opts.subscribers,
    publishers: opts.publishers,
    rate_target: opts.rate,
    payload_bytes: opts.payload,
    duration_seconds: round(publishSeconds),
    workers: nWorkers,
    members,
    setup_failures: setupFailures,
    setup_seconds: round(setupSeconds),
    sent: pr.sent,
    published: pr.published,
    unacked: pr.sent - pr.published - Object.values(pr.publishErrors).reduce((a, b) => a + b, 0),
    publish_errors: pr.publishErrors,
    published_per_sec: round(pr.published / publishSeconds, 1),
    expected,
    received,
    loss: expected - received,
    out_of_order: outOfOrder,
    gaps,
    publisher_order_violations: outOfOrder,
    deliveries_per_sec: round(received / deliverySeconds, 1),
    latency_ms: latency,
    ack_latency_ms: ackLatency,
    drain_seconds: round(drainSeconds),
    disconnected,
    received_per_room: receivedPerRoom,
    interrupted: false,
  };
  if (!opts.json) {
    const l = latency;
    process.stdout.write(
      `fanout (socket.io): ${members} members (${opts.subscribers} subscribers, ${opts.publishers} publishers) in ${opts.rooms} room(s), set-up ${report.setup_seconds} s\n` +
        `  published ${report.published}/${report.sent} at ${report.published_per_sec}/s, ${report.unacked} unacked, errors ${JSON.stringify(report.publish_errors)}\n` +
        `  deliveries ${received}/${expected} (loss ${report.loss}), ${report.deliveries_per_sec}/s, out of order ${outOfOrder}, gaps ${gaps}\n` +
        `  latency ms: p50 ${l.p50} p90 ${l.p90} p99 ${l.p99} p99.9 ${l.p999} max ${l.max}\n`,
    );
  }
  process.stdout.write(JSON.stringify(report) + '\n');
  await Promise.all(workers.map((w) => w.terminate()));
  process.exit(0);
}

process.on('SIGINT', () => process.exit(130));
if (isMainThread) {
  main().catch((e) => {
    process.stderr.write(`loadgen: ${e.stack || e}\n`);
    process.exit(1);
  });
} else {
  workerMain();
}
