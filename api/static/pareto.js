/* Top-1 against model size (issue 20 item 3; decision 020): the trade-off a user picks a model
 * from. Every eval result row carries its packed size (``model_bytes``: weights at their bits, the
 * 8-bit stem, BN, scales, ranges) and its average weight bits; a chart draws them, one series per
 * job and source (uniform bit-widths, an autobit allocation, a per-layer map given by the user)
 * named by its PTQ method (calibrate, adaround, brecq), each job's FP top-1 a dashed line, and a
 * table lists every point with the ones on the Pareto front marked.
 *
 * Loaded after app.js, whose helpers it uses (h, fmtNum, COLORS, tickValues, axisSize, main). Job
 * names reach the chart only through uPlot's legend (textContent) and text nodes, never markup. */
"use strict";

/** Where a row's configuration came from: "autobit" (allocated by the job), "map" (a per-layer map
 * in its ``bits``) or "uniform" (one bit-width for every layer). */
function paretoSource(row) { return row.autobit ? "autobit" : /^mixed-/.test(row.bits) ? "map" : "uniform"; }
/** The activation bits of a uniform "NwMa" row (the key its series splits on when two rows have
 * the same size: 4w4a and 4w8a store the same weights), else null. */
const actBits = (row) => { const m = /^\d+w(\d+)a$/.exec(row.bits); return m ? Number(m[1]) : null; };
const sizeKB = (row) => row.model_bytes / 1000;
const hasSize = (r) => r.top1 !== null && r.top1 !== undefined && typeof r.model_bytes === "number" && r.model_bytes > 0;

/** The rows no other row beats: none smaller or as small with a top-1 as high or higher (one strictly). */
function paretoFront(rows) {
  return new Set(rows.filter((r) => !rows.some((o) => o !== r && o.model_bytes <= r.model_bytes && o.top1 >= r.top1
    && (o.model_bytes < r.model_bytes || o.top1 > r.top1))));
}

/** Series of one job's quantized rows: grouped by source, a group split by activation bits where two
 * of its rows share a size (one x, two y), and by order where that is not enough. */
function paretoSeries(job, multi) {
  const rows = job.rows.filter((r) => hasSize(r) && r.bits !== "fp");
  const groups = new Map();
  for (const r of rows) {
    const key = paretoSource(r);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(r);
  }
  const out = [];
  for (const [source, members] of groups) {
    const ptq = [...new Set(members.map((r) => r.ptq || "calibrate"))].join("+");
    const base = `${source} · ${ptq}` + (multi ? ` · ${job.label}` : "");
    const collide = new Set(members.map(sizeKB)).size < members.length;
    const parts = new Map();
    for (const r of members) {
      const a = actBits(r);
      let key = collide && a !== null ? `${a}-bit act.` : "";
      let n = 1;
      while ((parts.get(key) || []).some((o) => o.model_bytes === r.model_bytes)) key = `${collide && a !== null ? `${a}-bit act. ` : ""}(${++n})`;
      if (!parts.has(key)) parts.set(key, []);
      parts.get(key).push(r);
    }
    for (const [key, rs] of parts) out.push({ label: key ? `${base} · ${key}` : base, rows: rs.slice().sort((x, y) => x.model_bytes - y.model_bytes), job });
  }
  return out;
}

/** The section: chart and table; null when no row of these jobs carries its size (rows written
 * before sizes were recorded, distill and finetune jobs). ``jobs``: [{job, rows, label}]. */
function paretoSection(jobs) {
  const multi = jobs.length > 1;
  const series = jobs.flatMap((j) => paretoSeries(j, multi));
  if (!series.length) return null;
  const fps = jobs.map((j) => ({ j, r: j.rows.find((r) => r.bits === "fp" && r.top1 !== null && r.top1 !== undefined) })).filter((x) => x.r);
  const box = h("div", { class: "chart", id: "pareto-chart" });
  const all = series.flatMap((s) => s.rows).concat(fps.map((x) => x.r).filter(hasSize));
  const front = paretoFront(all);
  const seriesOf = new Map(series.flatMap((s) => s.rows.map((r) => [r, s.label])));
  const fpLabel = (x) => `fp${multi ? ` · ${x.j.label}` : ""}`;
  const table = h("table", { id: "pareto-table" },
    h("thead", {}, h("tr", {}, ...["series", "bits", "avg weight bits", "model size (KB)", "top-1 (%)", "Pareto front"].map((c) => h("th", {}, c)))),
    h("tbody", {}, ...all.slice().sort((x, y) => x.model_bytes - y.model_bytes || y.top1 - x.top1).map((r) => h("tr", { class: front.has(r) ? "front" : null },
      h("td", {}, seriesOf.get(r) || fpLabel(fps.find((x) => x.r === r))), h("td", { class: "mono" }, r.bits),
      h("td", { class: "num" }, r.weight_bits_avg === undefined ? "" : fmtNum(r.weight_bits_avg)), h("td", { class: "num" }, fmtNum(sizeKB(r), 1)),
      h("td", { class: "num" }, fmtNum(r.top1)), h("td", {}, front.has(r) ? "yes" : "")))));
  const points = series.reduce((n, s) => n + s.rows.length, 0);
  Object.assign(box.dataset, { points: String(points), series: String(series.length), fp: String(fps.length),
    labels: series.map((s) => s.label).join("|"), front: String(front.size) });
  const section = h("div", { id: "pareto" }, h("h2", {}, "Results: top-1 vs model size"),
    h("p", { class: "muted" }, "Each point is a result row at its packed size (weights at their bits, the 8-bit stem, BN, scales and ranges; " +
      "the file adds its index and manifest). Hover for each series' value; dashed: FP top-1. The table marks the Pareto front " +
      "(no row smaller with a top-1 as high)."), box, table);
  const xsAll = series.flatMap((s) => s.rows.map(sizeKB));
  const lo = Math.min(...xsAll), hi = Math.max(...xsAll), pad = Math.max((hi - lo) * 0.06, hi * 0.03);
  const tables = series.map((s) => [s.rows.map(sizeKB), s.rows.map((r) => r.top1)]);
  const grid = [...new Set(xsAll)].sort((a, b) => a - b);
  for (const x of fps) tables.push([grid, grid.map(() => x.r.top1)]);
  const data = tables.length === 1 ? tables[0] : uPlot.join(tables);
  // the row under the cursor, per series: x -> row (uPlot.join aligns every table on the union of x)
  const at = series.map((s) => new Map(s.rows.map((r) => [sizeKB(r), r])));
  const color = (k) => COLORS[k % COLORS.length];
  const jobColor = (j) => color(series.findIndex((s) => s.job === j));
  const opts = { width: Math.min(900, main.clientWidth - 40), height: 340, legend: { live: true },
    scales: { x: { time: false, range: [Math.max(0, lo - pad), hi + pad] } },
    series: [{ label: "model size", value: (_u, v) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(1)} KB`) },
      ...series.map((s, k) => ({ label: s.label, stroke: color(k), width: 2, spanGaps: true, points: { show: true, size: 8, fill: color(k) },
        value: (u, v, _si, i) => { if (v === null || v === undefined) return "–"; const r = at[k].get(u.data[0][i]);
          return r ? `${fmtNum(v)}% (${r.bits}${r.weight_bits_avg === undefined ? "" : `, ${fmtNum(r.weight_bits_avg)} bits`})` : fmtNum(v); } })),
      ...fps.map((x) => ({ label: `${fpLabel(x)} (${fmtNum(x.r.top1)}%${hasSize(x.r) ? `, ${fmtNum(sizeKB(x.r), 1)} KB` : ""})`,
        stroke: jobColor(x.j), width: 1, dash: [6, 4], points: { show: false }, value: (_u, v) => (v === null || v === undefined ? "–" : `${fmtNum(v)}%`) }))],
    axes: [{ label: "model size (KB)", values: tickValues(box, "x") }, { label: "top-1 (%)", values: tickValues(box, "y"), size: axisSize }] };
  requestAnimationFrame(() => { new uPlot(opts, data, box); box.dataset.drawn = "1"; });
  return section;
}
