'use strict';
// Small SVG charts for bench/report.js, written as text: no plotting dependency.
//   lineChart({ title, xLabel, yLabel, series: [{ name, color, points: [[x, y, {hollow}]], dash }],
//               logX, logY, refLines: [{ y, label }] })
//   barChart({ title, yLabel, categories, series: [{ name, color, values }], stacked, logY })
// Both return the SVG document as a string.

const W = 720;
const H = 400;
const M = { left: 78, right: 24, top: 46, bottom: 58 };
const FONT = 'font-family="Helvetica, Arial, sans-serif"';

const esc = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

function fmt(v) {
  const a = Math.abs(v);
  if (a === 0) return '0';
  if (a >= 1e6) return `${+(v / 1e6).toFixed(a >= 1e7 ? 0 : 1)}M`;
  if (a >= 1e3) return `${+(v / 1e3).toFixed(a >= 1e4 ? 0 : 1)}k`;
  if (a >= 1) return `${+v.toFixed(a >= 10 ? 0 : 1)}`;
  if (a >= 0.01) return `${+v.toFixed(2)}`;
  return v.toExponential(0);
}

// Ticks for a linear axis: 1, 2 or 5 × 10^k steps.
function linearTicks(lo, hi, n = 6) {
  const span = hi - lo || 1;
  const raw = span / n;
  const p = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * p).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
  return ticks;
}

// Ticks for a log axis: powers of ten, with 2 and 5 in between when the range is short.
function logTicks(lo, hi) {
  const ticks = [];
  const d0 = Math.floor(Math.log10(lo));
  const d1 = Math.ceil(Math.log10(hi));
  const mult = d1 - d0 <= 3 ? [1, 2, 5] : [1];
  for (let d = d0; d <= d1; d++) {
    for (const m of mult) {
      const t = m * 10 ** d;
      if (t >= lo * 0.999 && t <= hi * 1.001) ticks.push(t);
    }
  }
  return ticks;
}

function scale(lo, hi, a, b, log) {
  if (log) {
    const l0 = Math.log10(lo);
    const l1 = Math.log10(hi);
    return (v) => a + ((Math.log10(Math.max(v, lo)) - l0) / (l1 - l0 || 1)) * (b - a);
  }
  return (v) => a + ((v - lo) / (hi - lo || 1)) * (b - a);
}

function range(values, log, zero) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (log) {
    lo = 10 ** Math.floor(Math.log10(lo));
    hi = 10 ** Math.ceil(Math.log10(hi));
  } else {
    if (zero) lo = Math.min(0, lo);
    const t = linearTicks(lo, hi);
    hi = Math.max(hi, t[t.length - 1]);
    lo = Math.min(lo, t[0]);
  }
  if (lo === hi) hi = lo + 1;
  return [lo, hi];
}

function frame(title, xLabel, yLabel, body) {
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" ${FONT} font-size="12">`,
    `<rect width="${W}" height="${H}" fill="#ffffff"/>`,
    `<text x="${W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">${esc(title)}</text>`,
    `<text x="${M.left + (W - M.left - M.right) / 2}" y="${H - 12}" text-anchor="middle">${esc(xLabel)}</text>`,
    `<text transform="translate(16 ${M.top + (H - M.top - M.bottom) / 2}) rotate(-90)" text-anchor="middle">${esc(yLabel)}</text>`,
    ...body,
    '</svg>',
    '',
  ].join('\n');
}

function yAxis(ticks, y, x0, x1) {
  const out = [];
  for (const t of ticks) {
    const yy = y(t).toFixed(1);
    out.push(`<line x1="${x0}" x2="${x1}" y1="${yy}" y2="${yy}" stroke="#e4e4e4"/>`);
    out.push(`<text x="${x0 - 6}" y="${yy}" dy="4" text-anchor="end" fill="#444">${fmt(t)}</text>`);
  }
  return out;
}

function legend(series, x, y) {
  const out = [];
  series.forEach((s, i) => {
    const yy = y + i * 17;
    const dash = s.dash ? ` stroke-dasharray="${s.dash}"` : '';
    out.push(`<line x1="${x}" x2="${x + 22}" y1="${yy}" y2="${yy}" stroke="${s.color}" stroke-width="2.5"${dash}/>`);
    out.push(`<text x="${x + 28}" y="${yy}" dy="4">${esc(s.name)}</text>`);
  });
  const width = 40 + Math.max(...series.map((s) => String(s.name).length)) * 6.6;
  return [`<rect x="${x - 8}" y="${y - 12}" width="${width}" height="${series.length * 17 + 8}" fill="#ffffff" fill-opacity="0.85" stroke="#cccccc"/>`, ...out];
}

// `nested`: series that lie on top of each other (capacity ramps along the diagonal) are drawn
// widest first, so each stays visible as a band around the ones after it.
function lineChart({ title, xLabel, yLabel, series, logX = false, logY = false, refLines = [], legendAt = 'left', nested = false }) {
  const pts = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  if (pts.length === 0) return null;
  const xs = pts.map((p) => p[0]).filter((v) => !logX || v > 0);
  const ys = pts.map((p) => p[1]).concat(refLines.map((r) => r.y)).filter((v) => !logY || v > 0);
  const [x0, x1] = range(xs, logX, true);
  const [y0, y1] = range(ys, logY, true);
  const px = scale(x0, x1, M.left, W - M.right, logX);
  const py = scale(y0, y1, H - M.bottom, M.top, logY);
  const body = [];
  body.push(...yAxis(logY ? logTicks(y0, y1) : linearTicks(y0, y1), py, M.left, W - M.right));
  for (const t of logX ? logTicks(x0, x1) : linearTicks(x0, x1)) {
    const xx = px(t).toFixed(1);
    body.push(`<line x1="${xx}" x2="${xx}" y1="${M.top}" y2="${H - M.bottom}" stroke="#f0f0f0"/>`);
    body.push(`<text x="${xx}" y="${H - M.bottom + 16}" text-anchor="middle" fill="#444">${fmt(t)}</text>`);
  }
  body.push(`<line x1="${M.left}" x2="${W - M.right}" y1="${H - M.bottom}" y2="${H - M.bottom}" stroke="#888"/>`);
  body.push(`<line x1="${M.left}" x2="${M.left}" y1="${M.top}" y2="${H - M.bottom}" stroke="#888"/>`);
  for (const r of refLines) {
    const yy = py(r.y).toFixed(1);
    body.push(`<line x1="${M.left}" x2="${W - M.right}" y1="${yy}" y2="${yy}" stroke="#999" stroke-dasharray="5 4"/>`);
    body.push(`<text x="${W - M.right - 4}" y="${yy}" dy="-4" text-anchor="end" fill="#666">${esc(r.label)}</text>`);
  }
  const solid = series.filter((s) => !s.dash).length;
  series.forEach((s, idx) => {
    const p = s.points.filter((q) => Number.isFinite(q[0]) && Number.isFinite(q[1]) && (!logX || q[0] > 0) && (!logY || q[1] > 0));
    if (p.length === 0) return;
    const widen = nested && !s.dash ? (solid - 1 - idx) * 3 : 0;
    const d = p.map((q, i) => `${i ? 'L' : 'M'}${px(q[0]).toFixed(1)},${py(q[1]).toFixed(1)}`).join(' ');
    const dash = s.dash ? ` stroke-dasharray="${s.dash}"` : '';
    body.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="${2.2 + widen}"${dash}${widen ? ' stroke-opacity="0.85"' : ''}/>`);
    for (const q of p) {
      const hollow = q[2] && q[2].hollow;
      body.push(`<circle cx="${px(q[0]).toFixed(1)}" cy="${py(q[1]).toFixed(1)}" r="${(3.6 + widen / 2).toFixed(1)}" fill="${hollow ? '#ffffff' : s.color}" stroke="${s.color}" stroke-width="1.6"/>`);
    }
  });
  const lx = legendAt === 'right' ? W - M.right - 230 : M.left + 14;
  body.push(...legend(series, lx, M.top + 14));
  return frame(title, xLabel, yLabel, body);
}

function barChart({ title, yLabel, xLabel = '', categories, series, stacked = false, logY = false }) {
  const totals = categories.map((_, i) =>
    stacked ? series.reduce((s, se) => s + (Number(se.values[i]) || 0), 0) : Math.max(...series.map((se) => Number(se.values[i]) || 0)),
  );
  const all = stacked ? totals : series.flatMap((s) => s.values.map(Number)).filter((v) => Number.isFinite(v) && (!logY || v > 0));
  if (all.length === 0) return null;
  const [y0, y1] = logY ? range(all, true) : range([0, ...all], false, true);
  const py = scale(y0, y1, H - M.bottom, M.top, logY);
  // The legend gets a column of its own on the right, clear of the bars.
  const right = 210;
  const body = [];
  body.push(...yAxis(logY ? logTicks(y0, y1) : linearTicks(y0, y1), py, M.left, W - right));
  body.push(`<line x1="${M.left}" x2="${W - right}" y1="${H - M.bottom}" y2="${H - M.bottom}" stroke="#888"/>`);
  const slot = (W - M.left - right) / categories.length;
  const groupW = slot * 0.7;
  const barW = stacked ? groupW : groupW / series.length;
  categories.forEach((c, i) => {
    const gx = M.left + i * slot + (slot - groupW) / 2;
    let base = y0;
    series.forEach((s, j) => {
      const v = Number(s.values[i]);
      if (!Number.isFinite(v) || (logY && v <= 0)) return;
      const x = stacked ? gx : gx + j * barW;
      const top = stacked ? base + v : v;
      const yTop = py(top);
      const yBot = py(stacked ? base : y0);
      body.push(`<rect x="${x.toFixed(1)}" y="${yTop.toFixed(1)}" width="${(barW - 2).toFixed(1)}" height="${Math.max(0, yBot - yTop).toFixed(1)}" fill="${s.color}"/>`);
      if (!stacked) body.push(`<text x="${(x + barW / 2 - 1).toFixed(1)}" y="${(yTop - 4).toFixed(1)}" text-anchor="middle" font-size="10" fill="#333">${fmt(v)}</text>`);
      if (stacked) base = top;
    });
    if (stacked) body.push(`<text x="${(gx + groupW / 2).toFixed(1)}" y="${(py(totals[i]) - 5).toFixed(1)}" text-anchor="middle" font-size="11" font-weight="bold">${fmt(totals[i])}</text>`);
    body.push(`<text x="${(gx + groupW / 2).toFixed(1)}" y="${H - M.bottom + 17}" text-anchor="middle">${esc(c)}</text>`);
  });
  body.push(...legend(series, W - right + 18, M.top + 14));
  return frame(title, xLabel, yLabel, body);
}

module.exports = { lineChart, barChart };
