'use strict';
// Writes docs/benchmarks.md from the raw results of bench/run.sh.
//   node bench/report.js WORK_DIR OUT_FILE
const fs = require('node:fs');
const path = require('node:path');
const { lineChart, barChart } = require('./svg.js');

const [work, out] = process.argv.slice(2);
if (!work || !out) {
  console.error('usage: node bench/report.js WORK_DIR OUT_FILE');
  process.exit(2);
}

const tsv = (file) => {
  const o = {};
  if (!fs.existsSync(file)) return o;
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const i = line.indexOf('\t');
    if (i > 0) o[line.slice(0, i)] = line.slice(i + 1);
  }
  return o;
};
const machine = tsv(path.join(work, 'machine.tsv'));
// Write coalescing of the coalesce rounds (older work directories: 5 ms).
const coalesceMs = Number(machine.coalesce_ms || 5);

function load(name) {
  const meta = tsv(path.join(work, `${name}.meta`));
  if (!meta.name) return null;
  let r = null;
  try {
    r = JSON.parse(fs.readFileSync(path.join(work, `${name}.json`), 'utf8'));
  } catch {
    r = null;
  }
  const tck = Number(meta.clk_tck || 100);
  const run = {
    name,
    meta,
    r,
    cmd: meta.cmd.trim(),
    exit: Number(meta.exit),
    serverCpu: Number(meta.server_ticks) / tck,
    redisCpu: Number(meta.redis_ticks) / tck,
    loadgenCpu: Number(meta.loadgen_cpu_s),
    wall: Number(meta.end) - Number(meta.start),
    // The front processes (gateways, Socket.IO instances, floor): user and system CPU.
    frontUser: Number(meta.front_user_ticks || 0) / tck,
    frontSys: Number(meta.front_sys_ticks || 0) / tck,
    // RUN_GROUPS of run.sh: { label: { user, sys } } in seconds.
    groups: Object.fromEntries(
      Object.entries(meta)
        .filter(([k]) => k.startsWith('group_'))
        .map(([k, v]) => {
          const [u, sy] = v.split(' ').map(Number);
          return [k.slice(6), { user: u / tck, sys: sy / tck }];
        }),
    ),
  };
  run.writes = writeSeries(name, Number(meta.writes_start));
  run.window = publishWindow(run, tck);
  return run;
}

// Write system calls of the front processes (perf stat -I 100 -x, over the run): a cumulative
// series [[unix seconds, calls so far], …], or null.
function writeSeries(name, start) {
  const file = path.join(work, `${name}.writes`);
  if (!Number.isFinite(start) || !fs.existsSync(file)) return null;
  const perInterval = new Map();
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    const a = line.trim().split(',');
    if (a.length < 4 || line.startsWith('#')) continue;
    const t = Number(a[0]);
    const n = Number(a[1]);
    if (!Number.isFinite(t) || !Number.isFinite(n)) continue;
    perInterval.set(t, (perInterval.get(t) || 0) + n);
  }
  const times = [...perInterval.keys()].sort((x, y) => x - y);
  if (times.length < 2) return null;
  let sum = 0;
  return [[start, 0], ...times.map((t) => [start + t, (sum += perInterval.get(t))])];
}

// Write calls between two unix times (s), linearly interpolated; null without a series.
function writesBetween(series, t0, t1) {
  if (!series) return null;
  const at = (t) => {
    if (t <= series[0][0]) return series[0][1];
    for (let i = 1; i < series.length; i++) {
      if (series[i][0] >= t) {
        const [a, b] = [series[i - 1], series[i]];
        return a[1] + ((b[1] - a[1]) * (t - a[0])) / Math.max(1e-9, b[0] - a[0]);
      }
    }
    return series[series.length - 1][1];
  };
  return at(t1) - at(t0);
}

// CPU over the publishing window (publishing + drain; set-up and teardown left out), from the
// 10 Hz samples, linearly interpolated. Start = launch + set-up time (+0.2 s for the Node client,
// which starts publishing 200 ms after set-up).
function publishWindow(run, tck) {
  const r = run.r;
  if (!r || (r.scenario !== 'fanout' && r.scenario !== 'publish-api')) return null;
  const file = path.join(work, `${run.name}.samples`);
  if (!fs.existsSync(file)) return null;
  const s = fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number))
    .filter((a) => a.length >= 3 && a.every(Number.isFinite));
  if (s.length < 3) return null;
  const start = Number(run.meta.start) + r.setup_seconds + (r.server === 'socket.io' ? 0.2 : 0);
  const end = start + r.duration_seconds + (r.drain_seconds || 0);
  const at = (t, k) => {
    if (t <= s[0][0]) return s[0][k];
    for (let i = 1; i < s.length; i++) {
      if (s[i][0] >= t) {
        const [t0, t1] = [s[i - 1][0], s[i][0]];
        return s[i - 1][k] + ((s[i][k] - s[i - 1][k]) * (t - t0)) / Math.max(1e-9, t1 - t0);
      }
    }
    return s[s.length - 1][k];
  };
  if (end > s[s.length - 1][0] + 0.5) return null;
  return {
    seconds: end - start,
    server: (at(end, 1) - at(start, 1)) / tck,
    redis: (at(end, 2) - at(start, 2)) / tck,
    // User CPU of the front processes (column 4 of the samples; older runs have none).
    frontUser: s[0].length >= 4 ? (at(end, 3) - at(start, 3)) / tck : null,
    writes: writesBetween(run.writes, start, end),
  };
}

const names = fs
  .readdirSync(work)
  .filter((f) => f.endsWith('.meta'))
  .map((f) => f.slice(0, -5));
const runs = Object.fromEntries(names.map((n) => [n, load(n)]).filter(([, v]) => v));

const f = (x, d = 1) => (x == null || !Number.isFinite(Number(x)) ? '–' : Number(x).toFixed(d));
const int = (x) => (x == null || !Number.isFinite(Number(x)) ? '–' : Math.round(Number(x)).toLocaleString('en-US'));
const us = (cpuS, n) => (n > 0 ? (cpuS * 1e6) / n : null);
const median = (a) => {
  const b = a.filter((x) => x != null && Number.isFinite(x)).sort((x, y) => x - y);
  if (b.length === 0) return null;
  const m = Math.floor(b.length / 2);
  return b.length % 2 ? b[m] : (b[m - 1] + b[m]) / 2;
};
const emptyObj = (o) => !o || Object.keys(o).length === 0;
const brief = (o) => (emptyObj(o) ? 'none' : Object.entries(o).map(([k, v]) => `${k}: ${v}`).join(', '));

const L = [];
const p = (s = '') => L.push(s);

p('# Benchmarks');
p();
p(`Generated by \`bench/run.sh\`${machine.quick === '1' ? ' --quick' : machine.full === '1' ? '' : ' --no-100k'} on ${machine.date} (commit ${machine.commit}), ` +
  `in ${Math.round(Number(machine.elapsed_s || 0) / 60)} min. Re-run with \`bench/run.sh\`; it prints where the raw ` +
  'JSON, the CPU samples and the logs went.');
p();
p('**These runs share one 2-core machine**: the load generators share the two cores with the servers, Redis ' +
  'and each other, and any other work on the machine shows in the load average ' +
  `(${machine.loadavg_start} at the start, ${machine.loadavg_end} at the end; each round's is in ` +
  '[Rounds](#rounds-and-the-load-average-at-their-start)). Absolute numbers are therefore noisy and ' +
  'pessimistic, and CPU figures are inflated by the contention (cache misses, context switches and the time ' +
  'slices other processes take), most for the rounds that ran at a high load average; the fan-out rounds ' +
  'were run in alternation (Roomcast, Socket.IO, floor, Roomcast, …) so the systems saw comparable ' +
  'conditions, and CPU per delivery, which counts only the servers\' own CPU time, is the steadier comparison.');
p();

// ---------------------------------------------------------------------------------------------
p('## Machine and versions');
p();
p('| | |');
p('|---|---|');
p(`| CPUs (nproc) | ${machine.nproc} |`);
p(`| CPU model | ${machine.cpu} |`);
p(`| memory | ${machine.mem} |`);
p(`| kernel | ${machine.kernel} |`);
p(`| open files per process | ${machine.nofile} (soft = hard; cannot be raised) |`);
p(`| rustc | ${machine.rustc} |`);
p(`| Node.js | ${machine.node} |`);
p(`| redis-server | ${machine.redis} |`);
p(`| Roomcast crates (Cargo.lock) | tokio ${machine.crate_tokio}, tokio-tungstenite ${machine['crate_tokio-tungstenite']}, ` +
  `tungstenite ${machine.crate_tungstenite}, axum ${machine.crate_axum}, tonic ${machine.crate_tonic}, prost ${machine.crate_prost}, redis ${machine.crate_redis} |`);
p(`| Socket.IO reference (package-lock.json) | socket.io ${machine['npm_socket.io']}, @socket.io/redis-adapter ${machine['npm_@socket.io/redis-adapter']}, ` +
  `socket.io-adapter ${machine['npm_socket.io-adapter']}, engine.io ${machine['npm_engine.io']}, ws ${machine.npm_ws}, redis (node-redis) ${machine.npm_redis}, ` +
  `jsonwebtoken ${machine.npm_jsonwebtoken}; client: socket.io-client ${machine['npm_socket.io-client']}, engine.io-client ${machine['npm_engine.io-client']} |`);
p();

// ---------------------------------------------------------------------------------------------
const fanNames = (sys) =>
  Object.keys(runs)
    .filter((n) => n.startsWith(`fanout-${sys}-`))
    .sort((a, b) => Number(a.split('-').pop()) - Number(b.split('-').pop()));
const rcFan = fanNames('roomcast').map((n) => runs[n]);
// One connection publishing into a small room (run.sh: onec-roomcast-RATE).
const onecRuns = Object.values(runs)
  .filter((r) => /^onec-roomcast-\d+$/.test(r.name))
  .sort((a, b) => Number(a.name.split('-')[2]) - Number(b.name.split('-')[2]));
// Sustained: at least 95% of the rate published in the window, every publish acknowledged, in
// the connection's order, and delivered.
const onecSustained = (run) => {
  const r = run.r;
  return !!r && r.published_per_sec >= 0.95 * r.rate_target && r.loss <= 0 && r.unacked === 0 &&
    emptyObj(r.publish_errors) && r.publisher_order_violations === 0 && r.out_of_order === 0;
};
const sioFan = fanNames('socketio').map((n) => runs[n]);
const cpuPer = (run) => (run.r ? us(run.serverCpu, run.r.received) : null);
const redisPer = (run) => (run.r ? us(run.redisCpu, run.r.received) : null);
const winPer = (run) => (run.r && run.window ? us(run.window.server, run.r.received) : null);

// Capacity runs are named cap-<system>-l<ladder>-<rate>[-retry].
const capRuns = (sys, l) =>
  Object.keys(runs)
    .filter((n) => n.startsWith(`cap-${sys}-l${l}-`))
    .map((n) => runs[n]);
const capRate = (run) => Number(run.name.split('-')[3]);
const stepOk = (run) => {
  const r = run.r;
  return !!r && r.loss === 0 && r.received > 0 && r.unacked === 0 && emptyObj(r.publish_errors) &&
    emptyObj(r.setup_failures) && emptyObj(r.disconnected) && r.latency_ms && r.latency_ms.p99 <= 50;
};
const nLadders = Number(machine.ladders || 1);
// Steps of one ladder by rate: { rate: [first try, retry?] }
const ladderSteps = (sys, l) => {
  const o = {};
  for (const run of capRuns(sys, l)) (o[capRate(run)] ||= []).push(run);
  for (const k of Object.keys(o)) o[k].sort((a, b) => Number(a.meta.start) - Number(b.meta.start));
  return o;
};
const capacityOf = (sys, l) => {
  const steps = ladderSteps(sys, l);
  const rates = Object.keys(steps).map(Number).sort((a, b) => a - b);
  let best = null;
  let failedAt = null;
  for (const rate of rates) {
    if (steps[rate].some(stepOk)) best = rate;
    else {
      failedAt = rate;
      break;
    }
  }
  return { best, failedAt, steps: rates.length };
};
const capacity = (sys) => {
  const per = [];
  for (let l = 1; l <= nLadders; l++) per.push(capacityOf(sys, l));
  const done = per.filter((c) => c.steps > 0);
  // The lower of the ladders (conservative, the same rule for both systems).
  const bests = done.map((c) => (c.best == null ? 0 : c.best));
  const low = done.length ? Math.min(...bests) : null;
  return { per: done, low };
};
const rcCap = capacity('roomcast');
const sioCap = capacity('socketio');
const capOne = (c) => (c.best == null ? `< ${c.failedAt}` : `${c.best}${c.failedAt ? '' : '+'}`);
const capText = (c) => (c.per.length === 0 ? '–' : `${c.low === 0 ? '< ' + c.per[0].failedAt : c.low} msg/s (ladders: ${c.per.map(capOne).join(', ')})`);

const idle1 = runs['idle-1gw'];
const idle6 = runs['idle-6gw'];
// The connect rate: idle-1gw and its repeats on fresh clusters (idle-1gw-b, -c), the median.
const connectRuns = ['idle-1gw', 'idle-1gw-b', 'idle-1gw-c'].map((n) => runs[n]).filter((run) => run && run.r && run.r.connected);
const connectRates = connectRuns.map((run) => run.r.connect_rate);
const connectRate = connectRates.length ? median(connectRates) : null;
const connectRateText = connectRate == null
  ? 'not measured'
  : connectRates.length === 1
    ? `${int(connectRate)}/s`
    : `${int(connectRate)}/s, the median of ${connectRates.length} ramps on fresh clusters (${connectRates.map((x) => int(x)).join(', ')})`;

const floorFan = fanNames('floor').map((n) => runs[n]);
const floorCap = capacity('floor');
const ratio = (a, b) => (a != null && b != null && b > 0 ? a / b : null);
// Front user CPU (gateways / Socket.IO instances / floor) per delivery, publishing window.
const frontUserPer = (run) => (run.r && run.window && run.window.frontUser != null ? us(run.window.frontUser, run.r.received) : null);
// All processes of the system over the publishing window, Redis included.
const winAllPer = (run) => (run.r && run.window ? us(run.window.server + run.window.redis, run.r.received) : null);
// Write system calls of the front processes per delivery, publishing window.
const writesPer = (run) => (run.r && run.window && run.window.writes != null && run.r.received ? run.window.writes / run.r.received : null);
const sys3 = [
  { key: 'roomcast', name: 'Roomcast', fan: rcFan, cap: rcCap, color: '#1f77b4' },
  { key: 'socketio', name: 'Socket.IO', fan: sioFan, cap: sioCap, color: '#d62728' },
  { key: 'floor', name: 'floor', fan: floorFan, cap: floorCap, color: '#2ca02c' },
];
for (const sy of sys3) {
  const m = (fn) => median(sy.fan.map(fn));
  sy.cpu = m(cpuPer);
  sy.win = m(winPer);
  sy.winAll = m(winAllPer);
  sy.redis = m(redisPer);
  sy.frontUser = m(frontUserPer);
  sy.writes = m(writesPer);
  sy.p99 = m((r) => r.r && r.r.latency_ms.p99);
  sy.dps = m((r) => r.r && r.r.deliveries_per_sec);
}
const [RC, SIO, FL] = sys3;
const lightRc = runs['light-roomcast'] && runs['light-roomcast'].r ? runs['light-roomcast'] : null;
const lightFl = runs['light-floor'] && runs['light-floor'].r ? runs['light-floor'] : null;

// The many-rooms ramps: runs many-<system>[-cluster], each a `loadgen fanout --steps` run.
const MANY = [
  { key: 'many-roomcast', name: 'Roomcast', color: '#1f77b4' },
  { key: 'many-socketio', name: 'Socket.IO', color: '#d62728' },
  { key: 'many-floor', name: 'floor', color: '#2ca02c' },
  { key: 'many-roomcast-cluster', name: 'Roomcast, Redis Cluster', color: '#9467bd' },
];
// One `loadgen fanout --steps` ramp: its steps, the try that counts at each rate, the best.
function prepareRamp(m) {
  m.run = runs[m.key];
  m.steps = m.run && m.run.r && Array.isArray(m.run.r.steps) ? m.run.r.steps : [];
  // The step that counts at each rate: a passing try if there is one, else the last try.
  const byRate = new Map();
  for (const st of m.steps) {
    const prev = byRate.get(st.rate_target);
    if (!prev || (!prev.passed && (st.passed || st.attempt > prev.attempt))) byRate.set(st.rate_target, st);
  }
  m.final = [...byRate.values()].sort((x, y) => x.rate_target - y.rate_target);
  const passed = m.final.filter((st) => st.passed);
  m.best = passed.length ? passed[passed.length - 1] : null;
  m.failed = m.final.find((st) => !st.passed) || null;
  const num = (v) => (Number.isFinite(Number(v)) ? Number(v) : null);
  m.cpuPerDelivery = (st) => us(num(st.cpu_seconds && st.cpu_seconds.server), st.received);
  m.frontUserPerDelivery = (st) => us(num(st.cpu_user_seconds && st.cpu_user_seconds.gateways), st.received);
  m.redisTotal = (st) => Object.values(st.redis_cpu_seconds || {}).reduce((a, b) => a + Number(b), 0);
  m.redisPerPublish = (st) => (Object.keys(st.redis_cpu_seconds || {}).length ? us(m.redisTotal(st), st.published) : null);
  m.cpuPerPublish = (st) => us(num(st.cpu_seconds && st.cpu_seconds.server) + m.redisTotal(st), st.published);
  m.writesPerDelivery = (st) => {
    const w = m.run ? writesBetween(m.run.writes, st.begin_unix_ms / 1000, st.end_unix_ms / 1000) : null;
    return w != null && st.received ? w / st.received : null;
  };
  m.skip = fs.existsSync(path.join(work, `${m.key}.skip`)) ? fs.readFileSync(path.join(work, `${m.key}.skip`), 'utf8').trim() : null;
}
for (const m of MANY) prepareRamp(m);
// Client publishes into the server-API rounds' rooms (1,000 rooms of one subscriber each).
const CPUB = { key: 'cpub-roomcast', name: 'Roomcast' };
prepareRamp(CPUB);
const manyOf = (key) => MANY.find((m) => m.key === key);
// Small rooms at a chat's pace (small-<system>-N): one `loadgen fanout --steps 1000` step each.
const smallRuns = (system) => Object.values(runs)
  .filter((r) => new RegExp(`^small-${system}-\\d+$`).test(r.name) && r.r && Array.isArray(r.r.steps) && r.r.steps.length)
  .sort((a, b) => a.name.localeCompare(b.name, 'en', { numeric: true }));
const smallStep = (run) => run.r.steps[0];
const smallRedis = (st) => Object.values(st.redis_cpu_seconds || {}).reduce((a, b) => a + Number(b), 0);
const smallPerPublish = (run) => {
  const st = smallStep(run);
  return us(Number(st.cpu_seconds && st.cpu_seconds.server) + smallRedis(st), st.published);
};
const SMALL = { roomcast: smallRuns('roomcast'), batched: smallRuns('batched'), floor: smallRuns('floor') };
// The batched rounds' gateway PUBLISH_BATCH_MS (run.sh: SMALL_BATCH_MS).
const smallBatchMs = Number(machine.small_batch_ms || 20);
// Publishes per gateway PublishBatch call of a Roomcast round (run.sh: NAME.calls), or null.
const publishesPerCall = (run) => {
  const file = path.join(work, `${run.name}.calls`);
  if (!fs.existsSync(file)) return null;
  const [calls, publishes] = fs.readFileSync(file, 'utf8').trim().split(/\s+/).map(Number);
  return calls > 0 ? publishes / calls : null;
};
const maxRate = (m) => (!m.run ? null : m.best ? m.best.rate_target : 0);
const maxText = (m) => {
  if (!m.run) return m.skip ? 'skipped' : 'not run';
  if (!m.run.r) return `no result (exit ${m.run.exit})`;
  if (!m.best) return `< ${m.final.length ? m.final[0].rate_target : '?'} publishes/s`;
  return `${int(m.best.published_per_sec)} publishes/s (${int(m.best.deliveries_per_sec)} deliveries/s)${m.failed ? '' : ', the highest step: the ramp did not reach a failure'}`;
};

// Connection set-up on one gateway (idle-1gw): gateway + auth-service CPU per connection.
// Gateway + auth-service CPU over the ramp alone (`<run>.setup`: 10 Hz tick samples), per
// connection: from the run's start to the end of the ramp plus 0.3 s for the last handshakes'
// backend calls.
const rampCpu = (run) => {
  if (!run || !run.r || !run.r.connected || run.r.ramp_seconds == null) return null;
  const file = path.join(work, `${run.name}.setup`);
  if (!fs.existsSync(file)) return null;
  const s = fs
    .readFileSync(file, 'utf8')
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number))
    .filter((a) => a.length === 2 && a.every(Number.isFinite));
  const start = Number(run.meta.start);
  const end = start + run.r.ramp_seconds + 0.3;
  const before = s.filter((x) => x[0] <= start).pop();
  const after = s.find((x) => x[0] >= end);
  if (!before || !after) return null;
  const tck = Number(run.meta.clk_tck || 100);
  return ((after[1] - before[1]) * 1e6) / tck / run.r.connected;
};

const setupCpu = (run, labels) => {
  if (!run || !run.r || !run.r.connected || !labels.every((l) => run.groups[l])) return null;
  return us(labels.reduce((a, l) => a + run.groups[l].user + run.groups[l].sys, 0), run.r.connected);
};

// ---------------------------------------------------------------------------------------------
// Figures (docs/img/*.svg), written by this script.
const imgDir = path.join(path.dirname(out), 'img');
const figures = [];
function figure(file, svg, alt) {
  if (!svg) return;
  fs.mkdirSync(imgDir, { recursive: true });
  fs.writeFileSync(path.join(imgDir, file), svg);
  figures.push({ file, alt });
}
{
  // Capacity ramp, one 1000-subscriber room: offered deliveries/s against delivered, per system,
  // from every run into that room (ladder steps, the 50 and 200 msg/s rounds); hollow where the
  // run failed (loss, or p99 above 50 ms). Delivered is what arrived per second of the run, drain
  // included, so a system that falls behind plateaus below the diagonal.
  const series = sys3
    .map((sy) => {
      const all = Object.values(runs).filter((r) =>
        r.r && r.r.rooms === 1 && r.r.subscribers === 1000 &&
        (r.name.startsWith(`cap-${sy.key}-`) || r.name === `light-${sy.key}` || r.name.startsWith(`fanout-${sy.key}-`)));
      const byRate = new Map();
      for (const r of all) {
        const k = r.r.rate_target;
        if (!byRate.has(k)) byRate.set(k, []);
        byRate.get(k).push(r);
      }
      const points = [...byRate.keys()]
        .sort((a, b) => a - b)
        .map((rate) => {
          const rs = byRate.get(rate);
          const dps = median(rs.map((r) => r.r.deliveries_per_sec));
          const offered = rate * (median(rs.map((r) => r.r.members)) - 1);
          return [offered, dps, { hollow: !rs.some(stepOk) }];
        });
      const cap = sy.cap.low != null ? (sy.cap.low ? ` (passes up to ${sy.cap.low} msg/s)` : ' (fails from the first step)') : '';
      return { name: `${sy.name}${cap}`, color: sy.color, points };
    })
    .filter((se) => se.points.length);
  if (series.length) {
    const maxX = Math.max(...series.flatMap((se) => se.points.map((q) => q[0])));
    series.push({ name: 'offered', color: '#999999', dash: '5 4', points: [[0, 0], [maxX, maxX]] });
    figure('capacity-1000.svg', lineChart({
      title: 'Capacity: one room of 1000 subscribers (hollow: loss or p99 > 50 ms)',
      xLabel: 'offered deliveries/s (publish rate × members)',
      yLabel: 'delivered deliveries/s',
      series,
      nested: true,
    }), 'capacity ramp, one room of 1000 subscribers');
  }
}
{
  // CPU per delivery per system at 1000 × 200 msg/s: publishing window, medians.
  const cats = sys3.filter((sy) => sy.win != null);
  if (cats.length) {
    figure('cpu-fanout.svg', barChart({
      title: 'CPU per delivery, 1000 subscribers × 200 msg/s (publishing window, median round)',
      yLabel: 'µs of CPU per delivery',
      categories: cats.map((sy) => sy.name),
      stacked: true,
      series: [
        { name: 'front processes, user', color: '#4c78a8', values: cats.map((sy) => sy.frontUser) },
        { name: 'kernel + other processes', color: '#9ecae9', values: cats.map((sy) => (sy.frontUser != null ? sy.win - sy.frontUser : sy.win)) },
        { name: 'Redis', color: '#f58518', values: cats.map((sy) => (sy.winAll != null ? sy.winAll - sy.win : 0)) },
      ],
    }), 'CPU per delivery per system');
  }
}
{
  // Latency percentiles per system at 1000 × 200 msg/s (the round with the median p99).
  const pick = (fan) => {
    const ok = fan.filter((r) => r.r && r.r.latency_ms && r.r.latency_ms.count);
    if (!ok.length) return null;
    const sorted = ok.slice().sort((a, b) => a.r.latency_ms.p99 - b.r.latency_ms.p99);
    return sorted[Math.floor((sorted.length - 1) / 2)].r.latency_ms;
  };
  const lat = sys3.map((sy) => ({ sy, l: pick(sy.fan) })).filter((x) => x.l);
  if (lat.length) {
    const keys = [['p50', 'p50'], ['p90', 'p90'], ['p99', 'p99'], ['p999', 'p99.9'], ['max', 'max']];
    figure('latency-fanout.svg', barChart({
      title: 'Publish-to-delivery latency, 1000 subscribers × 200 msg/s (median round)',
      yLabel: 'ms (log scale)',
      categories: keys.map((k) => k[1]),
      logY: true,
      series: lat.map(({ sy, l }) => ({ name: sy.name, color: sy.color, values: keys.map((k) => l[k[0]]) })),
    }), 'latency percentiles per system');
  }
}
{
  const ramps = MANY.filter((m) => m.final.length);
  if (ramps.length) {
    const series = ramps.map((m) => ({
      name: `${m.name} (${m.best ? `passes up to ${int(m.best.rate_target)}/s` : 'fails from the first step'})`,
      color: m.color,
      points: m.final.map((st) => [st.rate_target, st.deliveries_per_sec / 4, { hollow: !st.passed }]),
    }));
    const xs = series.flatMap((se) => se.points.map((q) => q[0]));
    series.push({ name: 'offered', color: '#999999', dash: '5 4', points: [[Math.min(...xs), Math.min(...xs)], [Math.max(...xs), Math.max(...xs)]] });
    const rooms = Number(machine.many_rooms || 10000);
    figure('capacity-many-rooms.svg', lineChart({
      title: `Capacity ramp: ${int(rooms)} rooms × 5 members (hollow: step failed)`,
      xLabel: 'offered publishes/s',
      yLabel: 'delivered messages/s (deliveries ÷ 4)',
      series,
      logX: true,
      logY: true,
      nested: true,
    }), 'capacity ramp, many small rooms');
    figure('latency-many-rooms.svg', lineChart({
      title: `Latency per step: ${int(rooms)} rooms × 5 members (solid p99, dashed p50)`,
      xLabel: 'offered publishes/s',
      yLabel: 'ms (log scale)',
      series: ramps.flatMap((m) => [
        { name: `${m.name} p99`, color: m.color, points: m.final.map((st) => [st.rate_target, st.latency_ms.p99, { hollow: !st.passed }]) },
        { name: `${m.name} p50`, color: m.color, dash: '4 3', points: m.final.map((st) => [st.rate_target, st.latency_ms.p50]) },
      ]),
      logX: true,
      logY: true,
      refLines: [{ y: 50, label: 'p99 limit 50 ms' }],
      legendAt: 'left',
    }), 'latency percentiles per step, many small rooms');
    figure('cpu-many-rooms.svg', lineChart({
      title: `Server CPU per delivery: ${int(rooms)} rooms × 5 members (dashed: Redis included)`,
      xLabel: 'offered publishes/s',
      yLabel: 'µs of CPU per delivery',
      series: ramps.flatMap((m) => [
        { name: `${m.name}`, color: m.color, points: m.final.map((st) => [st.rate_target, m.cpuPerDelivery(st), { hollow: !st.passed }]) },
        ...(m.final.some((st) => m.redisPerPublish(st) != null)
          ? [{ name: `${m.name} + Redis`, color: m.color, dash: '5 3', points: m.final.map((st) => [st.rate_target, us(Number(st.cpu_seconds.server) + m.redisTotal(st), st.received)]) }]
          : []),
      ]),
      logX: true,
      legendAt: 'right',
    }), 'CPU per delivery per system, many small rooms');
  }
}

// ---------------------------------------------------------------------------------------------

// Publishes through the server API (run.sh section 6): one run per offered rate.
// papi-RATE: one message per Publish call; papib-RATE: PublishBatch calls of up to 64.
const papiOf = (prefix) => Object.values(runs)
  .filter((r) => new RegExp(`^${prefix}-\\d+$`).test(r.name))
  .sort((a, b) => Number(a.name.split('-')[1]) - Number(b.name.split('-')[1]));
const papiRuns = papiOf('papi');
const papibRuns = papiOf('papib');
const papiPassed = (run) => {
  const r = run.r;
  return !!r && r.published_per_sec >= 0.95 * r.rate_target && r.loss <= 0 && r.out_of_order === 0 &&
    r.gaps === 0 && emptyObj(r.publish_errors) && emptyObj(r.setup_failures) && r.latency_ms.p99 <= 50;
};
const papiBestOf = (list) => list.filter(papiPassed).map((run) => run.r.rate_target).reduce((a, b) => Math.max(a, b), 0) || null;
const papiTextOf = (list) => {
  const best = papiBestOf(list);
  return `${best != null ? `${int(best)} publishes/s passed` : 'no rate passed'} (${list
    .map((run) => (run.r ? `${int(run.r.rate_target)} offered: ${int(run.r.published_per_sec)}/s, p99 ${f(run.r.latency_ms.p99, 1)} ms` : `${run.name}: no result`))
    .join('; ')})`;
};
const papiBest = papiBestOf(papiRuns);
const papibBest = papiBestOf(papibRuns);
const papiText = papiRuns.length || papibRuns.length
  ? [papiRuns.length ? `one message per \`Publish\` call: ${papiTextOf(papiRuns)}` : null,
    papibRuns.length ? `\`PublishBatch\` calls of up to 64: ${papiTextOf(papibRuns)}` : null].filter(Boolean).join('; ')
  : 'not measured by this run';

p('## Summary');
p();
p('Same machine, same runs, fan-out scenario 1000 subscribers in 1 room, 200 msg/s total, 100-byte filler, ' +
  `${machine.duration} s of publishing, write coalescing off, through two gateways / two Socket.IO instances on one Redis / ` +
  'one floor process (`bench/floor`: the smallest server that does the job, see [the floor](#the-floor-reference)). ' +
  'Medians over the rounds; every round is listed further down. "Publishing window" counts CPU from the first ' +
  'publish to the last delivery (set-up and teardown left out): the delivery path.');
p();
const rf = (a) => f(ratio(a, FL.win), 2);
p('| metric | Roomcast | Socket.IO + redis-adapter | floor | Roomcast ÷ floor | Socket.IO ÷ Roomcast |');
p('|---|---:|---:|---:|---:|---:|');
p(`| server CPU per delivery, publishing window, all processes but Redis (µs) | ${f(RC.win, 2)} | ${f(SIO.win, 2)} | ${f(FL.win, 2)} | ${f(ratio(RC.win, FL.win), 2)}× | ${f(ratio(SIO.win, RC.win), 2)}× |`);
p(`| the same with Redis (µs) | ${f(RC.winAll, 2)} | ${f(SIO.winAll, 2)} | ${f(FL.winAll, 2)} | ${f(ratio(RC.winAll, FL.winAll), 2)}× | ${f(ratio(SIO.winAll, RC.winAll), 2)}× |`);
p(`| user CPU of the front processes per delivery, publishing window (µs): gateways, Socket.IO instances, floor | ${f(RC.frontUser, 2)} | ${f(SIO.frontUser, 2)} | ${f(FL.frontUser, 2)} | ${f(ratio(RC.frontUser, FL.frontUser), 2)}× | ${f(ratio(SIO.frontUser, RC.frontUser), 2)}× |`);
p(`| write system calls of the front processes per delivery, publishing window | ${f(RC.writes, 3)} | ${f(SIO.writes, 3)} | ${f(FL.writes, 3)} | | |`);
p(`| server CPU per delivery, whole run incl. set-up (µs) | ${f(RC.cpu, 2)} | ${f(SIO.cpu, 2)} | ${f(FL.cpu, 2)} | ${f(ratio(RC.cpu, FL.cpu), 2)}× | ${f(ratio(SIO.cpu, RC.cpu), 2)}× |`);
p(`| deliveries/s at 1000 × 200 msg/s | ${int(RC.dps)} | ${int(SIO.dps)} | ${int(FL.dps)} | | |`);
p(`| publish-to-delivery p99 at 1000 × 200 msg/s (ms) | ${f(RC.p99, 1)} | ${f(SIO.p99, 1)} | ${f(FL.p99, 1)} | | ${f(ratio(SIO.p99, RC.p99), 2)}× |`);
const capRatio = RC.cap.low && SIO.cap.low ? RC.cap.low / SIO.cap.low : null;
p(`| capacity: highest per-room rate, 1000 subscribers, zero loss, p99 ≤ 50 ms (lower of the ladders) | ${capText(RC.cap)} | ${capText(SIO.cap)} | ${capText(FL.cap)} | | ` +
  `${capRatio != null ? f(ratio(SIO.cap.low, RC.cap.low), 2) + '×' : '–'} |`);
{
  const [mr, ms, mf] = MANY;
  p(`| many small rooms (${int(Number(machine.many_rooms || 10000))} × 5 members): highest rate with zero loss and p99 ≤ 50 ms | ${maxText(mr)} | ${maxText(ms)} | ${maxText(mf)} | | |`);
}
p();
p('Connection set-up (one gateway, ~19,000 connections, `roomcast-cluster --gateways 1`): ' +
  (idle1 && idle1.r
    ? `${connectRateText.replace('/s', ' connections/s')}; ${rampCpu(idle1) != null ? `${f(rampCpu(idle1), 0)} µs of gateway + auth-service CPU per connection over the ramp (` : ''}` +
      `${f(setupCpu(idle1, ['gateway', 'auth']), 0)} µs over the whole run with the 10 s hold and the close${rampCpu(idle1) != null ? ')' : ''}, ` +
      `${int(idle1.r.rss_per_connection_bytes)} B of gateway RSS per idle connection.`
    : 'not measured.'));
p();
if (RC.writes != null && FL.writes != null && RC.writes > 0) {
  const lr = lightRc && lightFl ? ratio(winAllPer(lightRc), winAllPer(lightFl)) : null;
  p(`Reading the floor comparison: at 200 msg/s Roomcast's gateways made ${f(RC.writes, 2)} write calls per delivery ` +
    `(about ${f(1 / RC.writes, 1)} frames per write) against the floor's ${f(FL.writes, 2)}. With \`WRITE_DELAY_MS=0\` ` +
    'nothing is held back on purpose, but a gateway writer that had to wait for a core finds several frames queued ' +
    'for its socket and sends them in one call, which the floor, one write per frame by definition, never does; ' +
    'on a busy machine that is most of the difference.' +
    (lr != null
      ? ` The lighter round, 1000 × 50 msg/s, is closer to like for like (${f(writesPer(lightRc), 2)} write calls per ` +
        `delivery for Roomcast, ${f(writesPer(lightFl), 2)} for the floor): there Roomcast spent ${f(lr, 2)}× the floor's CPU per delivery.`
      : ''));
  p();
}
if (figures.length) {
  p('Figures (drawn by `bench/report.js`, SVG):');
  p();
  for (const fig of figures) p(`![${fig.alt}](img/${fig.file})`);
  p();
}

// Targets.
p('### Where the targets stand');
p();
p('| target | measured | status |');
p('|---|---|---|');
const met = (ok) => (ok == null ? '–' : ok ? 'met' : 'not met');
const floorRounds = Object.values(runs).filter((r) => r.name.startsWith('fanout-floor-') && r.r);
const floorBehind = floorRounds.filter((r) => r.r.loss > 0).length;
// A floor that fell behind (loss) did less work per second than was asked: not a floor to compare with.
const floorNote = floorBehind > 0
  ? `; not comparable in this run: the floor fell behind (lost messages) in ${floorBehind} of its ${floorRounds.length} rounds`
  : '';
const rcFloor = ratio(RC.win, FL.win);
const rcFloorAll = ratio(RC.winAll, FL.winAll);
p(`| Roomcast server CPU per delivery (all its processes) ≤ 1.2× the floor's, 1000 × 200 msg/s, coalescing off | ` +
  `${f(RC.win, 2)} µs vs ${f(FL.win, 2)} µs: ${f(rcFloor, 2)}× (with Redis: ${f(RC.winAll, 2)} µs, ${f(rcFloorAll, 2)}×), publishing window, ` +
  `at ${f(RC.writes, 2)} vs ${f(FL.writes, 2)} write calls per delivery; whole run ${f(ratio(RC.cpu, FL.cpu), 2)}×` +
  `${lightRc && lightFl ? `. At 50 msg/s: ${f(winAllPer(lightRc), 2)} µs vs ${f(winAllPer(lightFl), 2)} µs, ${f(ratio(winAllPer(lightRc), winAllPer(lightFl)), 2)}× (${f(writesPer(lightRc), 2)} vs ${f(writesPer(lightFl), 2)} writes per delivery)` : ''} | ` +
  `${floorBehind > 0 ? '–' : met(rcFloorAll == null ? null : rcFloorAll <= 1.2)} at 200 msg/s${floorNote}` +
  `${lightRc && lightFl && ratio(winAllPer(lightRc), winAllPer(lightFl)) != null ? `; ${met(ratio(winAllPer(lightRc), winAllPer(lightFl)) <= 1.2)} at 50 msg/s` : ''} |`);
// bench/fanout-instructions.sh lines: "<system>: <n> user-space instructions per delivery, <m> per
// message (…)" (older ones have no per-message count).
const instructions = {};
if (fs.existsSync(path.join(work, 'instructions.txt'))) {
  for (const line of fs.readFileSync(path.join(work, 'instructions.txt'), 'utf8').split('\n')) {
    const m = line.match(/^(\w+): (\d+) user-space instructions per delivery(?:, \d+ per message)? \(([^,]+),/);
    if (m) instructions[m[1]] = { n: Number(m[2]), load: m[3] };
  }
}
const instr = instructions.roomcast && instructions.floor
  ? `; user-space instructions per delivery under callgrind (\`bench/fanout-instructions.sh\`, ${instructions.roomcast.load}): ` +
    `${int(instructions.roomcast.n)} vs the floor's ${int(instructions.floor.n)}, ${f(instructions.roomcast.n / instructions.floor.n, 2)}×`
  : '';
p(`| gateway user CPU per delivery ≤ 0.4 µs | ${f(RC.frontUser, 2)} µs at 200 msg/s (floor: ${f(FL.frontUser, 2)} µs)` +
  `${lightRc ? `; ${f(frontUserPer(lightRc), 2)} µs at 50 msg/s (floor: ${f(lightFl ? frontUserPer(lightFl) : null, 2)} µs)` : ''}${instr} | ` +
  `${met(RC.frontUser == null ? null : RC.frontUser <= 0.4)} at 200 msg/s${lightRc && frontUserPer(lightRc) != null ? `; ${met(frontUserPer(lightRc) <= 0.4)} at 50 msg/s` : ''} |`);
const coalesced = Object.values(runs)
  .filter((r) => r.name.startsWith('coalesce-roomcast-') && r.r)
  .sort((a, b) => Number(a.meta.start) - Number(b.meta.start));
const coWin = median(coalesced.map(winAllPer));
const coP99 = coalesced.length ? Math.max(...coalesced.map((r) => r.r.latency_ms.p99)) : null;
const coRatio = ratio(coWin, FL.winAll);
p('| with `WRITE_DELAY_MS` or adaptive coalescing: below the floor, p99 < 50 ms | ' +
  (coalesced.length
    ? `\`WRITE_DELAY_MS=${coalesceMs}\`, 1000 × 200 msg/s: ${f(coWin, 2)} µs per delivery with Redis, publishing window (median of ${coalesced.length}), vs the floor's ${f(FL.winAll, 2)} µs: ${f(coRatio, 2)}×; ` +
      `p99 ${coalesced.map((r) => f(r.r.latency_ms.p99, 1)).join(', ')} ms; ${f(median(coalesced.map(writesPer)), 3)} write calls per delivery | ` +
      `${met(coRatio == null || coP99 == null ? null : coRatio < 1 && coP99 < 50)}${floorNote ? ` (the CPU comparison${floorNote})` : ''} |`
    : 'not measured by this run | – |'));
const idleCpu = setupCpu(idle1, ['gateway', 'auth']);
{
  // One connection's publishes (issue: pipelined, not serialized on the round trip).
  const fourP99 = median(rcFan.map((run) => (run.r ? run.r.latency_ms.p99 : null)));
  // onepub-roomcast-N (older work directories: one onepub-roomcast round).
  const ones = Object.values(runs).filter((r) => /^onepub-roomcast(-\d+)?$/.test(r.name) && r.r);
  const oneP99 = median(ones.map((run) => run.r.latency_ms.p99));
  p(`| the 1-publisher 1000 × 200 msg/s case has the p99 of the 4-publisher one | 1 publisher: p99 ${f(oneP99, 1)} ms` +
    `${ones.length > 1 ? ` (median; rounds ${ones.map((run) => f(run.r.latency_ms.p99, 1)).join(', ')})` : ''}; ` +
    `4 publishers: ${f(fourP99, 1)} ms (median; rounds ${rcFan.map((run) => (run.r ? f(run.r.latency_ms.p99, 1) : '–')).join(', ')}) | ` +
    `${met(oneP99 == null || fourP99 == null ? null : oneP99 <= fourP99)} |`);
  const c = onecRuns.find((run) => run.r && run.r.rate_target === 20000);
  p(`| one connection sustains ≥ 20,000 publishes/s to a small room | ${onecRuns.map((run) => (run.r ? `${int(run.r.rate_target)} offered: ${int(run.r.published_per_sec)}/s, loss ${int(run.r.loss)}, p99 ${f(run.r.latency_ms.p99, 1)} ms` : `${run.name}: no result`)).join('; ') || 'not measured by this run'} | ${met(c ? onecSustained(c) : null)} |`);
}
p(`| connection set-up ≥ 10,000/s on one gateway | ${connectRateText} | ${met(connectRate == null ? null : connectRate >= 10000)} |`);
const idleRamp = rampCpu(idle1);
p(`| server CPU per connection ≤ 100 µs (gateway + auth-service) | ` +
  `${idleRamp != null ? `${f(idleRamp, 0)} µs over the ramp (set-up); ` : ''}` +
  `${idleCpu != null ? `${f(idleCpu, 0)} µs over the whole run (ramp, 10 s hold with heartbeats, close)` : 'not measured'} | ` +
  `${met(idleRamp != null ? idleRamp <= 100 : idleCpu == null ? null : idleCpu <= 100)}${idleRamp != null ? ' (set-up)' : ''} |`);
const rss1 = idle1 && idle1.r && idle1.r.rss_per_connection_bytes;
const rss6 = idle6 && idle6.r && idle6.r.rss_per_connection_bytes;
const rssOk = rss1 != null && rss1 <= 4096 && (rss6 == null || rss6 <= 4096);
p(`| ≤ 4 KiB gateway RSS per idle connection (~19,000 on one gateway; 100,000 over several) | ` +
  `${rss1 != null ? `${int(rss1)} B at ${int(idle1.r.held)} held on 1 gateway` : 'not measured'}` +
  `${rss6 != null ? `; ${int(rss6)} B at ${int(idle6.r.held)} held on 6 gateways` : idle6 ? '' : '; 100,000: skipped'} | ${rss1 == null ? '–' : rssOk ? 'met' : 'not met'} |`);
{
  const mr = manyOf('many-roomcast');
  const mf = manyOf('many-floor');
  const at = mr.best || (mr.final.length ? mr.final[0] : null);
  const floorAt = at ? mf.final.find((st) => st.rate_target === at.rate_target) : null;
  const redisPer = at ? mr.redisPerPublish(at) : null;
  p(`| Redis CPU per publish ≤ 20 µs (history on), many small rooms | ${redisPer != null ? `${f(redisPer, 1)} µs at ${int(at.rate_target)} publishes/s` : 'not measured'} | ${met(redisPer == null ? null : redisPer <= 20)} |`);
  const rcPub = at ? mr.cpuPerPublish(at) : null;
  const flPub = floorAt ? mf.cpuPerPublish(floorAt) : null;
  p(`| server CPU per publish, all Roomcast processes incl. Redis, many small rooms ≤ 1.5× the floor's | ` +
    `${rcPub != null && flPub != null ? `${f(rcPub, 0)} µs vs ${f(flPub, 0)} µs at ${int(at.rate_target)} publishes/s: ${f(ratio(rcPub, flPub), 2)}×` : 'not measured'} | ` +
    `${met(rcPub == null || flPub == null ? null : rcPub / flPub <= 1.5)} |`);
  {
    // The same target in its own case: 2,000 members over 100 rooms, 10 msg/s each.
    const per = (runsOf) => median(runsOf.map(smallPerPublish));
    const rcS = per(SMALL.roomcast);
    const flS = per(SMALL.floor);
    const rounds = (runsOf) => runsOf.map((run) => f(smallPerPublish(run), 0)).join(', ');
    p(`| the same, small rooms at a chat's pace (2,000 members over 100 rooms, 10 msg/s each: the target's own case) | ` +
      `${rcS != null && flS != null ? `${f(rcS, 0)} µs vs ${f(flS, 0)} µs at 1,000 publishes/s: ${f(ratio(rcS, flS), 2)}× (medians; rounds ${rounds(SMALL.roomcast)} vs ${rounds(SMALL.floor)})` : 'not measured by this run'} | ` +
      `${met(rcS == null || flS == null ? null : rcS / flS <= 1.5)} |`);
    const bS = per(SMALL.batched);
    if (SMALL.batched.length) {
      const p99s = SMALL.batched.map((run) => f(smallStep(run).latency_ms.p99, 1)).join(', ');
      const ok = bS != null && flS != null && bS / flS <= 1.5 && SMALL.batched.every((run) => smallStep(run).passed);
      p(`| the same with \`PUBLISH_BATCH_MS=${smallBatchMs}\` on the gateways (more publishes per call, for latency) | ` +
        `${bS != null && flS != null ? `${f(bS, 0)} µs vs ${f(flS, 0)} µs: ${f(ratio(bS, flS), 2)}× (median; rounds ${rounds(SMALL.batched)}); p99 ${p99s} ms` : 'not measured by this run'} | ` +
        `${bS == null || flS == null ? 'not measured' : ok ? 'met with this setting' : 'not met'} |`);
    }
  }
  // Measured twice: in the many-rooms ramp (4 deliveries a publish) and into the server-API
  // rounds' rooms (one subscriber each), the like-for-like of the server-API target.
  const cpubRate = maxRate(CPUB);
  const flMax = maxRate(mf);
  p(`| ≥ 20,000 client publishes/s, zero loss, p99 ≤ 50 ms, one Redis | ` +
    `1,000 rooms of one subscriber each (as the server-API rounds): ${maxText(CPUB)}; ` +
    `many small rooms (10,000 × 5): ${maxText(mr)}${flMax ? ` (the floor: ${int(flMax)})` : ''} | ` +
    `${CPUB.run ? `${met((cpubRate || 0) >= 20000)} into one-subscriber rooms; ` : ''}${met(!mr.run ? null : (maxRate(mr) || 0) >= 20000)} in 10,000 × 5 |`);
  const mc = manyOf('many-roomcast-cluster');
  let clusterText = mc.skip ? `skipped (${mc.skip})` : 'not run';
  let clusterOk = null;
  if (mc.best) {
    const shards = Object.entries(mc.best.redis_cpu_seconds || {});
    const vals = shards.map(([, v]) => Number(v));
    const mean = vals.reduce((a, b) => a + b, 0) / (vals.length || 1);
    const spread = vals.length ? Math.max(...vals.map((v) => Math.abs(v - mean) / (mean || 1))) : null;
    clusterText = `${shards.map(([k, v]) => `${k} ${f(Number(v), 2)} s`).join(', ')} at ${int(mc.best.rate_target)} publishes/s: within ±${f((spread || 0) * 100, 0)}%`;
    clusterOk = spread != null && spread <= 0.2;
  }
  p(`| Redis Cluster: per-shard Redis CPU within ±20% of each other, many small rooms | ${clusterText} | ${met(clusterOk)} |`);
}
p(`| ≥ 30,000 publishes/s through the server API, zero loss, p99 ≤ 50 ms, one Redis | ${papiText} | ${met(papiRuns.length || papibRuns.length ? Math.max(papiBest || 0, papibBest || 0) >= 30000 : null)}${papibRuns.length ? ' (with `PublishBatch`)' : ''} |`);
p(`| (earlier) server CPU per delivery ≤ 1/5 of Socket.IO's | Roomcast ${f(RC.cpu, 2)} µs vs ${f(SIO.cpu, 2)} µs: ${f(ratio(SIO.cpu, RC.cpu), 2)}× less ` +
  `(publishing window: ${f(ratio(SIO.win, RC.win), 2)}×) | ${met(ratio(SIO.cpu, RC.cpu) == null ? null : ratio(SIO.cpu, RC.cpu) >= 5)} |`);
p(`| (earlier) capacity ≥ 2× Socket.IO's, one 1000-subscriber room | ${capText(RC.cap)} vs ${capText(SIO.cap)}: ${f(capRatio, 2)}× | ${met(capRatio == null ? null : capRatio >= 2)} |`);
const worstRcP99 = Math.max(...rcFan.map((r) => (r.r ? r.r.latency_ms.p99 : Infinity)));
p(`| (earlier) p99 ≤ 10 ms through the cluster at 1000 × 200 msg/s | ${rcFan.map((r) => (r.r ? f(r.r.latency_ms.p99, 1) : '–')).join(', ')} ms (rounds) | ` +
  `${rcFan.length === 0 ? '–' : worstRcP99 <= 10 ? 'met' : rcFan.some((r) => r.r && r.r.latency_ms.p99 <= 10) ? 'met in some rounds only' : 'not met'} |`);
p();

// ---------------------------------------------------------------------------------------------
p('## Rounds and the load average at their start');
p();
{
  const rounds = fs.existsSync(path.join(work, 'rounds.tsv'))
    ? fs.readFileSync(path.join(work, 'rounds.tsv'), 'utf8').split('\n').filter(Boolean).map((l) => l.split('\t'))
    : [];
  if (rounds.length === 0) p('(not recorded)');
  else {
    p('`/proc/loadavg` (1, 5 and 15 min) when each round began. Two cores: a load average above 2 means ' +
      'runnable threads waited for a core. It counts this benchmark\'s own processes too (the servers and load ' +
      'generator of the round just before: about 2 to 4 when busy, and the 1-minute figure lags by tens of ' +
      'seconds), so what other work there was is roughly the excess over that.');
    p();
    p('| round | started (UTC) | minutes into the run | load average |');
    p('|---|---|---:|---|');
    for (const [name, time, load, at] of rounds) p(`| ${name} | ${time} | ${f(Number(at) / 60, 1)} | ${load} |`);
  }
}
p();

// ---------------------------------------------------------------------------------------------
p('## Idle connections and connect rate');
p();
p('`loadgen connections`: opens the connections as fast as the handshake concurrency allows (`--rate 0`), ' +
  'holds them 10 s, samples each gateway\'s VmRSS before the ramp and at the end of the hold. The cluster is ' +
  '`roomcast-cluster` (auth-service verifies every token over gRPC at the handshake). The load generator ' +
  'splits itself into worker processes of at most 15,000 connections (20,000 open files per process here).');
p();
p('Server CPU per connection = utime + stime of the gateways, room-services and auth-service over the whole ' +
  'run (ramp, 10 s hold with heartbeats, close), divided by connections.');
p();
p('| run | gateways | attempted | connected | failed | held at end | dropped | RSS before → after (MiB, summed) | RSS per connection | connect rate | time to connect p50 / p99 / max (ms) | server CPU per connection (µs) | of which gateway + auth-service (µs) | load generator CPU (s) |');
p('|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|');
for (const run of [idle1, runs['idle-1gw-b'], runs['idle-1gw-c'], idle6]) {
  if (!run) continue;
  const r = run.r;
  if (!r) {
    p(`| ${run.name} | | | | | | | | | | load generator exit ${run.exit}, no JSON | | | |`);
    continue;
  }
  const before = r.gateways.reduce((s, g) => s + (g.rss_before_kb || 0), 0) / 1024;
  const after = r.gateways.reduce((s, g) => s + (g.rss_after_kb || 0), 0) / 1024;
  p(`| ${run.name} | ${r.gateways.length} | ${int(r.attempted)} | ${int(r.connected)} | ${int(r.failed)}${emptyObj(r.failures) ? '' : ` (${brief(r.failures)})`} | ` +
    `${int(r.held)} | ${brief(r.dropped)} | ${f(before)} → ${f(after)} | ${int(r.rss_per_connection_bytes)} B | ${int(r.connect_rate)}/s | ` +
    `${f(r.connect_ms.p50, 1)} / ${f(r.connect_ms.p99, 1)} / ${f(r.connect_ms.max, 1)} | ${f(us(run.serverCpu, r.connected), 0)} | ` +
    `${f(setupCpu(run, ['gateway', 'auth']), 0)}${run.groups.gateway ? ` (${f(us(run.groups.gateway.user + run.groups.gateway.sys, r.connected), 0)} + ${f(us(run.groups.auth.user + run.groups.auth.sys, r.connected), 0)})` : ''} | ${f(run.loadgenCpu, 2)} |`);
}
if (!idle6) p('\nThe 100,000-connection run (6 gateways) was skipped (`--no-100k`).');
p();
if (idle1 && idle1.r && idle1.r.connected > 0) {
  const server = us(idle1.serverCpu, idle1.r.connected);
  const client = us(idle1.loadgenCpu, idle1.r.connected);
  p(`What bounds the connect rate: each connection costs the servers ${f(server, 0)} µs of CPU (the gateway's ` +
    'HTTP parsing and upgrade, its share of the batched gRPC calls, and auth-service\'s JWT checks) and the load generator ' +
    `${f(client, 0)} µs (TCP connect, token signing, its side of the handshake), counted over the whole run ` +
    `(ramp, hold and close): ${f(server + client, 0)} µs together. Both cores are busy during the ramp, and ` +
    '10,000 connections/s on two cores leaves at most 200 µs of CPU per connection for both sides together, ' +
    'whatever the number of gateways.');
  p();
}

// ---------------------------------------------------------------------------------------------
p('## Fan-out: 1000 subscribers × 200 msg/s, one room, full cluster');
p();
p('Roomcast: `roomcast-cluster --gateways 2 --room-services 2 --worker-threads 1 --gateway-env WRITE_DELAY_MS=0` (redis-server, ' +
  'auth-service, 2 room-services, 2 gateways, one runtime worker each: five server processes share the two cores; write coalescing off), `loadgen fanout`. Socket.IO: two ' +
  '`bench/socketio/server.js` instances on one private redis-server, `bench/socketio/loadgen.js`. Floor: one ' +
  '`bench/floor` process with four runtime threads (the gateways have one worker each), `loadgen fanout`. Subscribers and publishers are spread round-robin over the two ' +
  'gateways / instances. Each system first had one 3 s warm-up run (connection pools, JIT), not counted ' +
  '(it is in the raw results). Rows are in the order they ran.');
p();
p('Server CPU = utime + stime from `/proc/PID/stat` of all Roomcast processes (gateways, room-services, ' +
  'auth-service), of both Socket.IO instances or of the floor process, read before and after the load generator ' +
  'ran (so it includes connecting and joining the 1000+ members and closing them), divided by deliveries ' +
  'received. The "window" columns use a 10 Hz sample series over publishing + drain only; "front user" is the ' +
  'user time of the gateways / Socket.IO instances / floor over the window. Redis CPU is reported beside it, ' +
  'not included. The load generator\'s own CPU (user + sys) is in the last column.');
p();
p('| run | deliveries/s | expected | received | loss | out of order | p50 | p90 | p99 | p99.9 | max (ms) | server CPU (s) | µs/delivery | window µs/delivery | front user µs/delivery (window) | writes per delivery (window) | Redis CPU (s) | Redis µs/delivery | load generator CPU (s) |');
p('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
const fanOrder = Object.values(runs)
  .filter((r) => r.name.startsWith('fanout-'))
  .sort((a, b) => Number(a.meta.start) - Number(b.meta.start));
const fanRow = (run) => {
  const r = run.r;
  if (!r) {
    p(`| ${run.name} | load generator exit ${run.exit}, no JSON | | | | | | | | | | | | | | | | | |`);
    return;
  }
  const l = r.latency_ms;
  p(`| ${run.name} | ${int(r.deliveries_per_sec)} | ${int(r.expected)} | ${int(r.received)} | ${int(r.loss)} | ${int(r.out_of_order)} | ` +
    `${f(l.p50, 2)} | ${f(l.p90, 2)} | ${f(l.p99, 2)} | ${f(l.p999, 2)} | ${f(l.max, 2)} | ${f(run.serverCpu, 2)} | ${f(cpuPer(run), 2)} | ` +
    `${f(winPer(run), 2)} | ${f(frontUserPer(run), 2)} | ${f(writesPer(run), 3)} | ${f(run.redisCpu, 2)} | ${f(redisPer(run), 3)} | ${f(run.loadgenCpu, 2)} |`);
};
const fanHeader = () => {
  p('| run | deliveries/s | expected | received | loss | out of order | p50 | p90 | p99 | p99.9 | max (ms) | server CPU (s) | µs/delivery | window µs/delivery | front user µs/delivery (window) | writes per delivery (window) | Redis CPU (s) | Redis µs/delivery | load generator CPU (s) |');
  p('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
};
fanOrder.forEach(fanRow);
p();
const light = Object.values(runs)
  .filter((r) => r.name.startsWith('light-'))
  .sort((a, b) => Number(a.meta.start) - Number(b.meta.start));
if (light.length > 0) {
  p('### A lighter load: 1000 subscribers × 50 msg/s');
  p();
  p('One round per system at a quarter of the rate, one publisher: a shared machine keeps up with one write per ' +
    'delivery more easily here, so the three systems are compared where none of them has to fall back on ' +
    'putting several frames into one write.');
  p();
  fanHeader();
  light.forEach(fanRow);
  p();
}
if (coalesced.length > 0) {
  p(`### With write coalescing: \`WRITE_DELAY_MS=${coalesceMs}\``);
  p();
  p(`The 1000 × 200 msg/s fan-out on a cluster started with \`--gateway-env WRITE_DELAY_MS=${coalesceMs}\`: a ` +
    `connection's writer waits up to ${coalesceMs} ms for more frames and sends what it has in one write call. ` +
    'Compare with the floor\'s rounds above (one write per delivery by construction).');
  p();
  fanHeader();
  coalesced.forEach(fanRow);
  p();
}
const onePub = Object.values(runs)
  .filter((r) => r.name.startsWith('onepub-'))
  .sort((a, b) => Number(a.meta.start) - Number(b.meta.start));
if (onePub.length > 0) {
  p('### The same load from one publishing connection');
  p();
  p('200 msg/s to the 1000 subscribers from a single publisher connection instead of one per ' +
    '50 msg/s (a game host, a feed bridge): a connection\'s publishes are pipelined, so this should ' +
    'not be worse than the rows above.');
  p();
  fanHeader();
  onePub.forEach(fanRow);
  p();
}
{
  const perPublish = (runsOf) => median(runsOf.map((run) => (run.r && run.r.published && run.window ? us(run.window.redis, run.r.published) : null)));
  const setupPerMember = (runsOf) =>
    median(runsOf.map((run) => (run.r && run.window && run.r.members ? ((run.serverCpu - run.window.server) * 1e3) / run.r.members : null)));
  p(`Redis CPU per publish over the publishing window (median): Roomcast ${f(perPublish(rcFan), 1)} µs (one Lua script: offset, history stream, ` +
    `PUBLISH, TTLs), Socket.IO ${f(perPublish(sioFan), 1)} µs (one PUBLISH from the adapter). Server CPU outside the ` +
    `publishing window (set-up of the ${rcFan[0] && rcFan[0].r ? int(rcFan[0].r.members) : '1000+'} members, closing them), per member: ` +
    `Roomcast ${f(setupPerMember(rcFan), 2)} ms, Socket.IO ${f(setupPerMember(sioFan), 2)} ms; Roomcast announces every join to ` +
    'the members already in the room (`member_joined`), so filling a 1000-member room costs about 500,000 such deliveries.');
  p();
}
if (onecRuns.length > 0) {
  p('### One connection publishing into a small room');
  p();
  p('One publisher connection, as fast as each rate asks (open loop), into a room of 10 subscribers, ' +
    '5 s per rate, on `roomcast-cluster --gateways 2 --room-services 1` with the per-connection publish limit raised ' +
    '(`PUBLISH_RATE=100000`): a connection\'s publishes are pipelined in order, not sent one round trip at a time. ' +
    'Sustained: at least 95% of the rate published, all acknowledged, in the connection\'s order, none lost.');
  p();
  p('| offered/s | published/s | deliveries/s | loss | order violations | p50 (ms) | p99 (ms) | ack p99 (ms) | |');
  p('|---:|---:|---:|---:|---:|---:|---:|---:|---|');
  for (const run of onecRuns) {
    const r = run.r;
    if (!r) {
      p(`| ${run.name.split('-')[2]} | | | | | | | | no result (exit ${run.exit}) |`);
      continue;
    }
    p(`| ${int(r.rate_target)} | ${int(r.published_per_sec)} | ${int(r.deliveries_per_sec)} | ${int(r.loss)} | ${int(r.publisher_order_violations)} | ` +
      `${f(r.latency_ms.p50, 1)} | ${f(r.latency_ms.p99, 1)} | ${f(r.ack_latency_ms && r.ack_latency_ms.p99, 1)} | ${onecSustained(run) ? 'sustained' : '**not sustained**'} |`);
  }
  p();
}
const oddities = fanOrder.filter((run) => run.r && (!emptyObj(run.r.setup_failures) || !emptyObj(run.r.disconnected) || !emptyObj(run.r.publish_errors) || run.r.unacked > 0));
for (const run of oddities) {
  p(`- ${run.name}: set-up failures ${brief(run.r.setup_failures)}; disconnected ${brief(run.r.disconnected)}; ` +
    `publish errors ${brief(run.r.publish_errors)}; unacked ${run.r.unacked}.`);
}
if (oddities.length) p();

// ---------------------------------------------------------------------------------------------
// The profiled round (bench/profile.sh): where a delivery's CPU goes in the gateways.
const prof = tsv(path.join(work, 'profile.tsv'));
const profRun = runs['profile-roomcast'];
p('## Profile of the fan-out path');
p();
if (!prof.seconds || !profRun || !profRun.r) {
  p('(not profiled in this run: `perf` unavailable or `--no-profile`)');
  p();
} else {
  const secs = Number(prof.seconds);
  const deliveries = profRun.r.deliveries_per_sec * secs;
  const userUs = us(Number(prof.user_s), deliveries);
  const sysUs = us(Number(prof.sys_s), deliveries);
  const sendPct = Number(prof.sendto_pct);
  const sendUs = ((userUs + sysUs) * sendPct) / 100;
  const budget = FL.win != null ? FL.win * 1.2 : null;
  p(`One more Roomcast round (${profRun.cmd.replace(/^.*loadgen /, 'loadgen ')}) with both gateways sampled by ` +
    `\`bench/profile.sh\` (\`perf record -e cpu-clock -F 999 -g\`) for ${f(secs, 1)} s of steady publishing, ` +
    `${int(deliveries)} deliveries (${f(profRun.r.latency_ms.p99, 1)} ms p99 in this round, perf included).`);
  p();
  p('| gateways, per delivery | µs |');
  p('|---|---:|');
  p(`| user time (/proc utime) | ${f(userUs, 2)} |`);
  p(`| system time (/proc stime) | ${f(sysUs, 2)} |`);
  p(`| in \`sendto\`, kernel, inclusive (${f(sendPct, 1)}% of samples) | ${f(sendUs, 2)} |`);
  p(`| of which loopback receive processing run in the sender's context (\`net_rx_action\`, ${f(Number(prof.softirq_pct), 1)}%) | ${f(((userUs + sysUs) * Number(prof.softirq_pct)) / 100, 2)} |`);
  p();
  p(`Samples: ${f(Number(prof.kernel_pct), 1)}% in the kernel, ${f(Number(prof.user_pct), 1)}% in user space ` +
    '(the gateway, libc). Top functions by own samples:');
  p();
  p('| % | where | function |');
  p('|---:|---|---|');
  const tops = fs
    .readFileSync(path.join(work, 'profile.tsv'), 'utf8')
    .split('\n')
    .filter((l) => l.startsWith('top\t'))
    .map((l) => l.split('\t'))
    .slice(0, 15);
  for (const [, pct, kind, name] of tops) {
    p(`| ${pct.replace('%', '')} | ${kind === '[k]' ? 'kernel' : 'user'} | \`${name.length > 90 ? name.slice(0, 87) + '...' : name}\` |`);
  }
  p();
  p('What it shows: the work is the `sendto` of WebSocket frames to sockets (a subscriber gets a message every ' +
    '5 ms at 200 msg/s, so on a quiet machine each write carries one frame), and on loopback that ' +
    'system call also runs the receiving side\'s TCP processing. ' +
    (RC.writes != null
      ? `In the 200 msg/s rounds a gateway write carried ${f(1 / RC.writes, 1)} frames on average (${f(RC.writes, 2)} writes ` +
        'per delivery): a writer that waits for a core finds several frames queued. '
      : '') +
    (budget != null
      ? `The floor, which does nothing but those writes, spent ${f(FL.win, 2)} µs per delivery in the same rounds ` +
        `(front user time ${f(FL.frontUser, 2)} µs): the kernel's share of a delivery is the same for both, so ` +
        `what Roomcast spends above it (${f(RC.win != null ? RC.win - FL.win : null, 2)} µs per delivery, the ` +
        `1.2× target allows ${f(budget - FL.win, 2)} µs) is the gateway's user time, its wake-ups and the other ` +
        'processes. '
      : '') +
    'User space is what the gateway can still shave; the full perf report is `profile.txt` in the work directory.');
  p();
  // The latency floor: one message to 1000 subscribers is a burst of work on both sides.
  const lgPer = median(rcFan.map((r) => (r.r ? us(r.loadgenCpu, r.r.received) : null)));
  const burstMs = lgPer != null ? ((userUs + sysUs + lgPer) * 1000) / 1000 : null;
  const low = Object.values(runs)
    .filter((r) => r.name.startsWith('cap-roomcast-') && r.r && r.r.rate_target === 10)
    .map((r) => r.r.latency_ms.p99);
  if (burstMs != null) {
    p(`Why p99 ≤ 10 ms is out of reach here as well: one message to a 1000-member room is a burst of 1000 ` +
      `sends in the gateways (${f(userUs + sysUs, 2)} µs each) and 1000 receives in the load generator ` +
      `(${f(lgPer, 2)} µs each, its CPU over the fan-out rounds), about ${f(burstMs, 1)} ms of CPU on a 2-core ` +
      'machine, so the last member of a room gets a message several milliseconds after the first even when ' +
      `nothing else runs` + (low.length ? ` (p99 at 10 msg/s, the lightest capacity step: ${low.map((x) => f(x, 1)).join(', ')} ms)` : '') +
      '. At 200 msg/s these bursts keep both cores nearly busy, and the queueing adds the rest.');
    p();
  }
}

// ---------------------------------------------------------------------------------------------
p('## Capacity: highest per-room publish rate with 1000 subscribers');
p();
p(`${nLadders} ladder(s) per system of ${machine.step_duration} s runs at increasing total publish rates into one ` +
  '1000-subscriber room, Roomcast, Socket.IO and the floor interleaved at each rate; a system\'s ladder stops at its first failing ' +
  'step. A step passes with zero loss, every publish acknowledged, no member refused or dropped, and p99 ≤ 50 ms. ' +
  'Because the machine is shared, a failing step is tried once more and fails only when both tries fail (the ' +
  'retry is shown after the slash). The capacity figure is the lower of the ladders.');
p();
const cell = (run) => {
  if (!run) return '';
  if (!run.r) return `exit ${run.exit}, no JSON`;
  const r = run.r;
  return `${int(r.deliveries_per_sec)}/s, loss ${int(r.loss)}, p99 ${f(r.latency_ms.p99, 1)}${stepOk(run) ? '' : ' ✗'}`;
};
const cells = (tries) => (tries ? tries.map(cell).join(' / ') + (tries.some(stepOk) ? ' — **pass**' : ' — **fail**') : '');
for (let l = 1; l <= nLadders; l++) {
  const a = ladderSteps('roomcast', l);
  const b = ladderSteps('socketio', l);
  const c = ladderSteps('floor', l);
  const rates = [...new Set([...Object.keys(a), ...Object.keys(b), ...Object.keys(c)])].map(Number).sort((x, y) => x - y);
  if (rates.length === 0) continue;
  p(`Ladder ${l}:`);
  p();
  p('| rate (msg/s) | publishers | Roomcast: deliveries/s, loss, p99 (ms) | Socket.IO: deliveries/s, loss, p99 (ms) | floor: deliveries/s, loss, p99 (ms) |');
  p('|---:|---:|---|---|---|');
  for (const rate of rates) {
    const any = (a[rate] || b[rate] || c[rate])[0];
    p(`| ${rate} | ${any.r ? any.r.publishers : ''} | ${cells(a[rate])} | ${cells(b[rate])} | ${cells(c[rate])} |`);
  }
  p();
}
if (rcCap.per.length === 0 && sioCap.per.length === 0) p('(not run: `--no-capacity`)\n');
p(`Capacity: Roomcast ${capText(rcCap)}; Socket.IO ${capText(sioCap)}; floor ${capText(floorCap)}. The floor's ` +
  'ceiling is the machine\'s: the load generator receiving the deliveries shares the two cores.');
p();

// ---------------------------------------------------------------------------------------------
p('## Many small rooms: a rising rate until loss or p99 > 50 ms');
p();
{
  const rooms = Number(machine.many_rooms || 10000);
  if (MANY.every((m) => !m.run)) {
    p(Number(machine.many) === 0 ? '(not run: `--no-many-rooms`)' : '(not run)');
    p();
  } else {
    p(`${int(rooms)} rooms of 5 members (4 subscribers and 1 publisher each, ${int(rooms * 5)} connections), one ` +
      `\`loadgen fanout --steps\` run per system: one set-up, then ${machine.many_step} s of publishing at each total ` +
      'rate in turn (publishers phase-shifted, open loop), each step drained and counted on its own (every payload ' +
      'carries its step), 1 s pause, a failing step tried once more; the ramp stops at the first step that fails ' +
      'both tries. A step passes with zero loss, every publish acknowledged, no member dropped and p99 ≤ 50 ms. ' +
      'The same Rust load generator drives the three systems (`--protocol socketio` for Socket.IO), in worker ' +
      'processes of at most 15,000 members (a process may hold 20,000 open files here).');
    p();
    p('Roomcast: `roomcast-cluster --gateways 3 --room-services 2 --worker-threads 1`; Socket.IO: three instances on one Redis; ' +
      'both with each room\'s members spread over the three (connection n to front n mod 3, as a load balancer ' +
      'would). Floor: three processes of two runtime threads each, each room whole on one of them (`--placement room`: the floor has no ' +
      'cross-process fan-out). CPU per step from `/proc/PID/stat` at the step\'s edges (publishing + drain), Redis ' +
      'CPU from `INFO cpu` (`used_cpu_user + used_cpu_sys`) at the same edges. At the low steps CPU per delivery ' +
      'is mostly the upkeep of 50,000 idle connections (pings, timers, leases), spread over few deliveries; the ' +
      'figures at the highest passing step are the ones to compare. Writes per delivery count every write of the ' +
      'front processes, so here they include the `published` reply to each publish (0.25 per delivery with 4 ' +
      'recipients) and the keep-alive pings of the idle members.');
    p();
    p('| system | highest passing step | set-up of the members | CPU per delivery at that step, servers (µs) | + Redis (µs) | Redis CPU per publish (µs) | front user CPU per delivery (µs) |');
    p('|---|---|---:|---:|---:|---:|---:|');
    for (const m of MANY) {
      if (!m.run) continue;
      const st = m.best;
      const r = m.run.r;
      p(`| ${m.name} | ${maxText(m)} | ${r ? `${int(r.members)} in ${f(r.setup_seconds, 1)} s` : '–'} | ${st ? f(m.cpuPerDelivery(st), 2) : '–'} | ` +
        `${st && m.redisPerPublish(st) != null ? f(us(Number(st.cpu_seconds.server) + m.redisTotal(st), st.received), 2) : '–'} | ` +
        `${st ? f(m.redisPerPublish(st), 1) : '–'} | ${st ? f(m.frontUserPerDelivery(st), 2) : '–'} |`);
    }
    p();
    for (const m of MANY) {
      if (!m.run) continue;
      p(`### ${m.name}`);
      p();
      if (!m.run.r) {
        p(`(load generator exit ${m.run.exit}, no JSON; see its stderr in the work directory)`);
        p();
        continue;
      }
      const r = m.run.r;
      p(`${int(r.members)} members joined in ${f(r.setup_seconds, 1)} s` +
        `${emptyObj(r.setup_failures) ? '' : ` (set-up failures: ${brief(r.setup_failures)})`}; ${r.workers} load generator processes. ` +
        `Load average at the end of the ramp: ${m.run.meta.loadavg ? m.run.meta.loadavg : '?'}.`);
      p();
      const redisCols = [...new Set(m.steps.flatMap((st) => Object.keys(st.redis_cpu_seconds || {})))];
      p(`| offered publishes/s | try | published/s | deliveries/s | loss | p50 (ms) | p99 (ms) | server CPU (s) | µs/delivery | writes per delivery | ${redisCols.map((c) => `${c} CPU (s)`).join(' | ')}${redisCols.length ? ' | ' : ''}Redis µs/publish | load generator CPU (s) | |`);
      p(`|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|${redisCols.map(() => '---:|').join('')}---:|---:|---|`);
      for (const st of m.steps) {
        const cpu = st.cpu_seconds && st.cpu_seconds.server;
        p(`| ${int(st.rate_target)} | ${st.attempt + 1} | ${int(st.published_per_sec)} | ${int(st.deliveries_per_sec)} | ${int(st.loss)} | ` +
          `${f(st.latency_ms.p50, 2)} | ${f(st.latency_ms.p99, 2)} | ${f(cpu, 2)} | ${f(m.cpuPerDelivery(st), 2)} | ${f(m.writesPerDelivery(st), 2)} | ` +
          `${redisCols.map((c) => f(st.redis_cpu_seconds[c], 2)).join(' | ')}${redisCols.length ? ' | ' : ''}${f(m.redisPerPublish(st), 1)} | ${f(st.loadgen_cpu_seconds, 2)} | ` +
          `${st.passed ? 'pass' : `**fail**${st.unacked ? `, ${int(st.unacked)} unanswered` : ''}${emptyObj(st.publish_errors) ? '' : `, errors ${brief(st.publish_errors)}`}${st.disconnected ? `, ${st.disconnected} dropped` : ''}`} |`);
      }
      p();
    }
    const mc = manyOf('many-roomcast-cluster');
    if (!mc.run) {
      p('### Roomcast on a Redis Cluster (3 masters)');
      p();
      p(mc.skip ? `Skipped: ${mc.skip}` : '(not run)');
      p();
    }
  }
}

// ---------------------------------------------------------------------------------------------
p('## Publishes through the server API');
p();
if (!papiRuns.length && !papibRuns.length) {
  p('(not run)');
  p();
} else {
  p('`loadgen publish-api` into `roomcast-cluster --gateways 2 --room-services 2` (one Redis): 1,000 rooms of one ' +
    'WebSocket subscriber each, to room-service 0, at most 1,024 publishes in flight, 10 s per offered rate, each ' +
    'rate on a fresh cluster. "Publish" rows send one `ServerApi.Publish` call per message; "PublishBatch" rows ' +
    '(`--batch 64`) send `ServerApi.PublishBatch` calls of whatever piled up while earlier calls were in flight, at ' +
    'most 64 messages each and 16 calls at once, as a backend draining a queue would. A rate passes when at least 95% of it was ' +
    'published with no loss, no error and p99 ≤ 50 ms from publish to delivery. Only what was sent within the 10 s ' +
    'counts: a lane that fell behind (all 1,024 calls in flight) sends nothing after the window, so published/s is ' +
    'what the servers kept up with. CPU per publish over the publishing ' +
    'window (publishing + drain), per process group; the load generator, which shares the two cores, is listed too.');
  p();
  p('| calls | offered/s | published/s | deliveries/s | loss | p50 (ms) | p99 (ms) | ack p99 (ms) | room-services µs/publish | gateways µs/publish | Redis µs/publish | all servers + Redis µs/publish | load generator CPU (s) | |');
  p('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|');
  for (const run of [...papiRuns, ...papibRuns]) {
    const r = run.r;
    const calls = run.name.startsWith('papib-') ? 'PublishBatch' : 'Publish';
    if (!r) {
      p(`| ${calls} | ${run.name.split('-')[1]} | | | | | | | | | | | | no result (exit ${run.exit}) |`);
      continue;
    }
    const n = r.published;
    const g = (k) => (run.groups[k] ? us(run.groups[k].user + run.groups[k].sys, n) : null);
    const w = run.window;
    p(`| ${calls} | ${int(r.rate_target)} | ${int(r.published_per_sec)} | ${int(r.deliveries_per_sec)} | ${int(r.loss)} | ${f(r.latency_ms.p50, 1)} | ` +
      `${f(r.latency_ms.p99, 1)} | ${f(r.ack_latency_ms && r.ack_latency_ms.p99, 1)} | ${f(g('roomservice'), 1)} | ${f(g('gateway'), 1)} | ` +
      `${f(w ? us(w.redis, n) : us(run.redisCpu, n), 1)} | ${f(w ? us(w.server + w.redis, n) : us(run.serverCpu + run.redisCpu, n), 1)} | ` +
      `${f(run.loadgenCpu, 1)} | ${papiPassed(run) ? 'pass' : '**fail**'}${r.unacked ? `, ${int(r.unacked)} in flight at the end` : ''}${emptyObj(r.publish_errors) ? '' : `, errors ${brief(r.publish_errors)}`} |`);
  }
  p();
  p('Room-service and gateway CPU are over the whole run (including the subscribers\' set-up); Redis and the ' +
    'all-process figure over the publishing window.');
  p();
}

p('## Client publishes into 1,000 rooms of one subscriber each');
p();
if (!CPUB.run) {
  p('(not run)');
  p();
} else if (!CPUB.run.r) {
  p(`(load generator exit ${CPUB.run.exit}, no JSON; see its stderr in the work directory)`);
  p();
} else {
  p('The server-API rounds\' rooms, published into by clients instead: `roomcast-cluster --gateways 2 --room-services 2` ' +
    '(one Redis), 1,000 rooms of one WebSocket subscriber each plus one publishing connection per room (its own ' +
    '`published` replies, the subscriber the delivery), one `loadgen fanout --steps` run: each total rate for ' +
    `${machine.cpub_step || 10} s, drained and counted on its own, a failing step tried once more. A step passes with ` +
    'zero loss, every publish acknowledged and p99 ≤ 50 ms. CPU per publish over publishing + drain.');
  p();
  p('| offered publishes/s | try | published/s | deliveries/s | loss | p50 (ms) | p99 (ms) | ack p99 (ms) | servers µs/publish | gateways µs/publish | Redis µs/publish | load generator CPU (s) | |');
  p('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|');
  for (const st of CPUB.steps) {
    const server = Number(st.cpu_seconds && st.cpu_seconds.server);
    const gw = Number(st.cpu_seconds && st.cpu_seconds.gateways);
    p(`| ${int(st.rate_target)} | ${st.attempt + 1} | ${int(st.published_per_sec)} | ${int(st.deliveries_per_sec)} | ${int(st.loss)} | ` +
      `${f(st.latency_ms.p50, 2)} | ${f(st.latency_ms.p99, 2)} | ${f(st.ack_latency_ms && st.ack_latency_ms.p99, 2)} | ` +
      `${f(us(server, st.published), 1)} | ${f(us(gw, st.published), 1)} | ${f(CPUB.redisPerPublish(st), 1)} | ${f(st.loadgen_cpu_seconds, 2)} | ` +
      `${st.passed ? 'pass' : `**fail**${st.unacked ? `, ${int(st.unacked)} unanswered` : ''}${emptyObj(st.publish_errors) ? '' : `, errors ${brief(st.publish_errors)}`}`} |`);
  }
  p();
}

p("## Small rooms at a chat's pace");
p();
if (!SMALL.roomcast.length && !SMALL.floor.length) {
  p('(not run)');
  p();
} else {
  p('2,000 members over 100 rooms (19 subscribers and 1 publisher each), 10 msg/s per room: 1,000 publishes/s for ' +
    `${machine.small_step || 10} s, drained and counted (one \`loadgen fanout --steps 1000\` run per round), the case the ` +
    'server-CPU-per-publish target names. Roomcast: the fan-out rounds\' cluster (`roomcast-cluster --gateways 2 ' +
    '--room-services 2 --worker-threads 1`, one Redis, members spread over the gateways); floor: one process of four ' +
    'runtime threads; rounds in alternation, with a third system: the same Roomcast cluster with ' +
    `\`--gateway-env PUBLISH_BATCH_MS=${smallBatchMs}\` (small-batched: a gateway's publish calls at most one per ` +
    `${smallBatchMs} ms instead of 5, so each carries more publishes, for that much more latency). CPU per publish over ` +
    'publishing + drain, Redis included. At this pace a call carries few publishes (publishes per call: the gateways\' ' +
    '`PublishBatch` calls over the round), so each call\'s own work (the gRPC hop, the script call, a wake-up of each ' +
    'process on the way) weighs as much as the deliveries; each gateway with members of the room reads every ' +
    'message from Redis.');
  p();
  p('| round | published/s | deliveries/s | loss | p50 (ms) | p99 (ms) | server CPU µs/publish (incl. Redis) | front processes µs/publish | Redis µs/publish | publishes per call | load generator CPU (s) | |');
  p('|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|');
  const rows = [];
  for (let i = 0; i < Math.max(SMALL.roomcast.length, SMALL.batched.length, SMALL.floor.length); i++) {
    for (const run of [SMALL.roomcast[i], SMALL.batched[i], SMALL.floor[i]]) if (run) rows.push(run);
  }
  for (const run of rows) {
    const st = smallStep(run);
    const front = Number(st.cpu_seconds && st.cpu_seconds.gateways);
    const redis = Object.keys(st.redis_cpu_seconds || {}).length ? f(us(smallRedis(st), st.published), 1) : '–';
    p(`| ${run.name} | ${int(st.published_per_sec)} | ${int(st.deliveries_per_sec)} | ${int(st.loss)} | ${f(st.latency_ms.p50, 2)} | ` +
      `${f(st.latency_ms.p99, 2)} | ${f(smallPerPublish(run), 0)} | ${f(us(front, st.published), 0)} | ${redis} | ${f(publishesPerCall(run), 1)} | ${f(st.loadgen_cpu_seconds, 2)} | ` +
      `${st.passed ? 'pass' : '**fail**'} |`);
  }
  p();
}

p('## Command lines');
p();
p('As run by `bench/run.sh` (`$SECRET` is a per-run HS256 secret; URLs are the free ports of that run):');
p();
p('```sh');
p('cargo build --release --workspace');
p('(cd bench/socketio && npm ci)    # only when node_modules is missing');
p('target/release/roomcast-cluster --gateways 1 --room-services 1 --secret "$SECRET"   # idle, 1 gateway');
if (idle6) p('target/release/roomcast-cluster --gateways 6 --room-services 2 --secret "$SECRET"   # idle, 6 gateways');
p('target/release/roomcast-cluster --gateways 2 --room-services 2 --worker-threads 1 --secret "$SECRET" \\');
p('  --gateway-env PUBLISH_RATE=1000 --gateway-env PUBLISH_BURST=2000 --gateway-env WRITE_DELAY_MS=0   # fan-out and capacity');
if (coalesced.length > 0) {
  p('target/release/roomcast-cluster --gateways 2 --room-services 2 --worker-threads 1 --secret "$SECRET" \\');
  p(`  --gateway-env PUBLISH_RATE=1000 --gateway-env PUBLISH_BURST=2000 --gateway-env WRITE_DELAY_MS=${coalesceMs}   # fan-out, coalescing on`);
}
p('redis-server --port $PORT --bind 127.0.0.1 --save \'\' --appendonly no --maxclients 10000');
p('PORT=$P0 REDIS_URL=redis://127.0.0.1:$PORT JWT_SECRET=$SECRET node bench/socketio/server.js   # one per instance');
p('target/release/floor --addr 127.0.0.1:$PF --threads T   # the floor reference, one per process: T = 4 beside two gateways, 2 per process beside three');
if (MANY.some((m) => m.run)) {
  p('target/release/roomcast-cluster --gateways 3 --room-services 2 --worker-threads 1 --secret "$SECRET"   # many small rooms');
}
if (SMALL.roomcast.length) {
  p('target/release/roomcast-cluster --gateways 2 --room-services 2 --worker-threads 1 --secret "$SECRET"   # small rooms at a chat\'s pace');
}
if (SMALL.batched.length) {
  p('target/release/roomcast-cluster --gateways 2 --room-services 2 --worker-threads 1 --secret "$SECRET" \\');
  p(`  --gateway-env PUBLISH_BATCH_MS=${smallBatchMs}   # small rooms at a chat's pace, batched`);
}
const shown = new Set();
for (const run of Object.values(runs).sort((a, b) => Number(a.meta.start) - Number(b.meta.start))) {
  // One line per distinct command shape (capacity steps differ only by rate and publishers).
  const key = run.name.startsWith('cap-') ? run.name.split('-').slice(0, 2).join('-') : run.name.replace(/-\d+$/, '');
  if (shown.has(key)) continue;
  shown.add(key);
  p(`# ${run.name}${run.name.startsWith('cap-') ? ' (every step: its --rate, --publishers = ceil(rate / 50), --duration)' : run.name.startsWith('fanout-') ? ' (every round)' : ''}`);
  // A command line can be very long (many URLs and PIDs): break it before each option.
  p(run.cmd.length > 160 ? run.cmd.replace(/ --/g, ' \\\n  --') : run.cmd);
}
p('```');
p();

// ---------------------------------------------------------------------------------------------
p('## How to read these numbers');
p();
p('- **Publishers.** Every fan-out run uses `ceil(rate / 50)` publisher connections, each at ≤ 50 msg/s ' +
  '(4 publishers at 200 msg/s), under the gateway\'s default per-connection limit; the Socket.IO and floor runs ' +
  'use exactly the same publishers. Publishers are members of their room, so each publish is delivered to ' +
  '1000 subscribers + the other publishers: at 200 msg/s that is 200 × 1003 = 200,600 deliveries/s.');
p('- **Latency** is delivery time minus the send time carried in the payload, recorded for every delivery. ' +
  'Roomcast\'s `loadgen` keeps an HDR histogram (3 significant digits); the Node client keeps every sample and ' +
  'takes exact order statistics. Both clients publish open-loop (a publish is due at its time whether or not ' +
  'earlier ones were answered), so a server that falls behind shows it as latency, not as a lower send rate.');
p('- **Ordering.** Roomcast\'s `out_of_order` checks room offsets at every member. Socket.IO has no offsets, ' +
  'so the Node client checks each publisher\'s sequence numbers at every member instead.');
p('- **Loss** = expected − received, where expected = Σ over acknowledged publishes of (members of the room − ' +
  'the sender). A run drains for at most 5 s after publishing; what has not arrived by then counts as lost.');
p('- **The load generators share the machine.** Roomcast\'s `loadgen` is multi-threaded Rust; the Socket.IO ' +
  'client runs `socket.io-client` in two worker threads (plus one for the publishers). Decoding ~200k ' +
  'messages/s costs the client side about as much CPU as the servers spend, on the same two cores, so ' +
  'latency and capacity here are bounded by the machine as a whole, for both systems.');
p('- <a id="the-floor-reference"></a>**The floor reference** (`bench/floor`, one Rust process): the smallest ' +
  'server that does the fan-out job on this machine. It speaks Roomcast\'s client frames (`connected`, `join` → ' +
  '`joined`, `publish` → `published`, `message` with per-room offsets), so `loadgen` drives it unchanged; it ' +
  'checks no token and keeps no history, presence or Redis. A publish builds the complete WebSocket frame once ' +
  'and the publisher\'s own task writes it to each member\'s socket with one `write` call each: no task, queue or ' +
  'wake-up per message or per recipient (a socket that does not take a frame gets a backlog its own task ' +
  'flushes). A room\'s messages go out in offset order: the first publisher to find the room idle delivers, later ' +
  'publishes are queued to it. Its CPU per delivery is what the kernel and a minimal user space cost here, ' +
  'the floor the targets are measured against. Its frames are a little shorter than Roomcast\'s ' +
  '(no `epoch` or `user` fields).');
p('- **Write calls per delivery.** `perf stat` counts the front processes\' `sendto`, `write`, `writev` and ' +
  '`sendmsg` system calls (syscall tracepoints, every 100 ms), integrated over the same window as the CPU. ' +
  'The floor makes one write per delivery by construction. Roomcast\'s writer, with `WRITE_DELAY_MS=0`, writes ' +
  'whatever is queued for a socket when it runs: one frame when it keeps up, several when the machine is busy ' +
  'and frames queue up while it waits for a core; fewer writes per delivery is then most of why its CPU per ' +
  'delivery can fall below the floor\'s.');
p('- **CPU per delivery, shared machine.** Both the floor and the systems measured pay the kernel\'s cost of ' +
  'loopback TCP (a `write` on loopback also runs the receiver\'s TCP processing, charged to the sender); ' +
  'contention with other processes on two cores inflates every figure, so the ratios to the floor, measured in ' +
  'alternating rounds, are steadier than the absolute numbers.');
p('- **Socket.IO reference** (`bench/socketio/server.js`): the documented setup, `new Server(httpServer, { adapter: ' +
  'createAdapter(pubClient, subClient) })` with node-redis clients, a handshake middleware verifying an HS256 ' +
  'JWT (`jsonwebtoken`), `join` → `socket.join(room)`, `publish` → `socket.to(room).emit("message", …)` ' +
  '(everyone in the room on every instance except the sender) and an acknowledgement. Both transports stay ' +
  'enabled on the server; the load client connects with `transports: ["websocket"]`.');
p();

// ---------------------------------------------------------------------------------------------
p('## Raw results');
p();
p('<details><summary>JSON objects printed by the load generators</summary>');
p();
p('```json');
for (const run of Object.values(runs).sort((a, b) => Number(a.meta.start) - Number(b.meta.start))) {
  p(`// ${run.name}: server CPU ${f(run.serverCpu, 2)} s, Redis CPU ${f(run.redisCpu, 2)} s, load generator CPU ${f(run.loadgenCpu, 2)} s, wall ${f(run.wall, 1)} s`);
  // Per-room counts of a many-rooms run are thousands of numbers: summed up instead.
  const brief = (r) => {
    if (!r || !Array.isArray(r.received_per_room) || r.received_per_room.length <= 20) return r;
    const a = r.received_per_room;
    return { ...r, received_per_room: `${a.length} rooms, min ${Math.min(...a)}, max ${Math.max(...a)}, sum ${a.reduce((x, y) => x + y, 0)}` };
  };
  p(run.r ? JSON.stringify(brief(run.r)) : `(exit ${run.exit}, no JSON)`);
}
p('```');
p();
p('</details>');
p();

fs.writeFileSync(out, L.join('\n') + '\n');
console.error(`wrote ${out}`);
