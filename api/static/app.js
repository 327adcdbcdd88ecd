/* The SSQL dashboard: plain JavaScript, no build step; charts by uPlot (vendored).
 *
 * The API key lives in localStorage (one sign-in per browser, every tab, until "Sign out", which
 * signs out every tab) and goes out only as the Authorization header of fetch() calls: live updates read the SSE stream through fetch (EventSource cannot send a header) and
 * downloads are fetched as blobs (a plain link cannot either). It never appears in a URL. */
"use strict";

const KEY = "ssql.apiKey";
const PAPER_BITS = ["fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a"];
const TERMINAL = ["succeeded", "failed", "cancelled"];
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#db2777"];
const main = document.getElementById("main");
let view = { abort: new AbortController(), timers: [] };
let cache = { catalog: null, openapi: null };

class ApiError extends Error {
  constructor(status, body) {
    const d = body && body.detail;
    super(Array.isArray(d) ? d.map((x) => `${(x.loc || []).slice(1).join(".") || "body"}: ${x.msg}`).join("; ") : String(d ?? status));
    this.status = status; this.body = body;
  }
}

// -- helpers ---------------------------------------------------------------------------------------
const $ = (sel, root = document) => root.querySelector(sel);
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}
/** ``el.replaceChildren`` without the trap: it writes a null child as the text "null"; here
 * null, undefined and false children are left out (as ``h`` does). */
function fill(el, ...children) { el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)); }
const fmtNum = (v, d = 2) => (v === null || v === undefined ? "" : Number(v).toFixed(d));
function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return "--:--";
  s = Math.max(0, Math.round(s));
  const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
  return (hh ? hh + ":" + String(mm).padStart(2, "0") : String(mm).padStart(2, "0")) + ":" + String(ss).padStart(2, "0");
}
const fmtTime = (t) => (t ? new Date(t).toLocaleString() : "");
function fmtBytes(n) { const u = ["B", "KiB", "MiB", "GiB"]; let i = 0; while (n >= 1024 && i < 3) { n /= 1024; i++; } return `${n.toFixed(i ? 1 : 0)} ${u[i]}`; }
/** Tick labels that differ wherever the ticks do: the fewest decimals (or significant digits,
 * for very small or large values) that keep neighbouring ticks apart. uPlot's default repeats
 * labels on narrow ranges (an lr axis read 0.091, 0.091, 0.091). */
function fmtTicks(splits) {
  const finite = splits.filter((v) => v !== null && isFinite(v));
  const big = Math.max(0, ...finite.map(Math.abs));
  const sci = big !== 0 && (big < 1e-3 || big >= 1e6);
  for (let d = 0; d <= 12; d++) {
    const out = splits.map((v) => (v === null || !isFinite(v) ? "" : sci ? Number(v).toExponential(d) : Number(v).toFixed(d)));
    if (new Set(out).size === new Set(finite).size) return out.map((t) => (t === "-0" ? "0" : t));
  }
  return splits.map((v) => String(v));
}
/** uPlot's axis ``values`` callback using fmtTicks; the labels are kept on the chart's box (data-x-ticks / data-y-ticks). */
/** A y axis wide enough for its longest label (uPlot's fixed 50 px clipped "0.09105"). */
const axisSize = (_u, values) => (values && values.length ? Math.max(40, 14 + 7 * Math.max(...values.map((v) => String(v).length))) : 50);
//: tick steps of an integer axis (steps, epochs): never 1.2 epochs
const INT_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6];
const tickValues = (box, axis) => (_u, splits) => { const t = fmtTicks(splits); box.dataset[axis + "Ticks"] = t.join("|"); return t; };
function toast(text) { const t = h("div", { class: "toast" }, text); document.body.append(t); setTimeout(() => t.remove(), 3500); }
function later(fn, ms) { const id = setInterval(fn, ms); view.timers.push(id); return id; }
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "") || "jobs";
  const [path, query] = raw.split("?");
  return { parts: path.split("/"), params: new URLSearchParams(query || "") };
}
function go(hash) { location.hash = hash; }

// -- the API ---------------------------------------------------------------------------------------
const apiKey = () => localStorage.getItem(KEY);
async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  const init = { method: opts.method || "GET", headers, signal: opts.signal || view.abort.signal };
  if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(opts.json); }
  const r = await fetch(path, init);
  if (r.status === 401) { signOut("The server refused this key (401): sign in again."); throw new ApiError(401, { detail: "unauthorized" }); }
  if (!r.ok) { let body; try { body = await r.json(); } catch { body = { detail: r.statusText }; } throw new ApiError(r.status, body); }
  return r;
}
const getJSON = async (path, opts) => (await api(path, opts)).json();

/** Server-Sent Events through fetch (the key goes in the header): calls onEvent(data) per event. */
async function streamSSE(path, onEvent, signal) {
  const r = await api(path, { signal, headers: { Accept: "text/event-stream" } });
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i); buf = buf.slice(i + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}
function watchJob(id, onJob) {
  streamSSE(`/v1/jobs/${encodeURIComponent(id)}/events`, onJob, view.abort.signal).catch((e) => {
    if (e.name !== "AbortError" && !(e instanceof ApiError && e.status === 401)) console.warn("events", id, e);
  });
}
async function catalog() { return (cache.catalog ||= await getJSON("/v1/catalog")); }
async function openapi() { return (cache.openapi ||= await (await fetch("/openapi.json")).json()); }

// -- sign in ---------------------------------------------------------------------------------------
function signOut(message) {
  localStorage.removeItem(KEY);
  view.abort.abort();
  renderSignIn(message);
}
function renderSignIn(message) {
  $("#nav").hidden = true;
  main.replaceChildren($("#signin-tpl").content.cloneNode(true));
  if (message) $("#signin-error").textContent = message;
  $("#signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = $("#api-key").value.trim();
    const r = await fetch("/v1/jobs?limit=1", { headers: { Authorization: "Bearer " + key } });
    if (r.status === 401) { $("#signin-error").textContent = "This key is not valid (or was revoked)."; return; }
    localStorage.setItem(KEY, key);
    route();
  });
}

// -- progress --------------------------------------------------------------------------------------
function progressCell(job) {
  const p = job.progress || {};
  const frac = job.status === "succeeded" ? 1 : Number(p.fraction || 0);
  const pct = Math.round(frac * 1000) / 10;
  const bits = [`${pct.toFixed(pct % 1 ? 1 : 0)}%`];
  if (job.status === "running") bits.push("ETA " + fmtDuration(p.eta_s));
  return h("div", { class: "progress" + (frac >= 1 ? " done" : ""), dataset: { fraction: String(frac), jobId: job.id } },
    h("div", { class: "bar", role: "progressbar", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 },
      h("div", { style: `width:${pct}%` })),
    h("span", { class: "pct" }, bits.join(" · ")));
}
/** A linear-probe eval job's place: the bit-width being probed and that probe's epoch. Its progress
 * counts epochs summed over all bit-widths (probe i, epoch e of E reports i*E + e of n*E). */
function evalPosition(job) {
  const p = job.progress || {}, c = cfg(job), bits = c.bits, per = c.epochs;
  if (job.kind !== "eval" || p.phase !== "linear" || !Array.isArray(bits) || !bits.length || !(per >= 1) || !p.epoch) return null;
  const index = Math.min(Math.floor((p.epoch - 1) / per), bits.length - 1);
  return { bits: bits[index], index, count: bits.length, epoch: p.epoch - index * per, epochs: per };
}
function progressDetail(job) {
  const p = job.progress || {}, at = evalPosition(job), out = [];
  if (at) out.push(`probe ${at.bits} (${at.index + 1}/${at.count})`, `epoch ${at.epoch}/${at.epochs}`);
  else if (p.epoch && p.epochs) out.push(`epoch ${p.epoch}/${p.epochs}`);
  if (!at && p.step && p.total_steps) out.push(`step ${p.step}/${p.total_steps}`);
  if (p.phase) out.push(p.phase);
  return out.join(" · ");
}
const statusCell = (job) => h("span", { class: "status " + job.status }, job.status + (job.cancel_requested && job.status === "running" ? " (stopping)" : ""));
function duration(job) {
  if (!job.started_at) return "";
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return fmtDuration((end - new Date(job.started_at)) / 1000);
}
const cfg = (job) => (job.spec && job.spec.config) || {};

// -- jobs list -------------------------------------------------------------------------------------
/** A job's cost estimate (spec.estimate, or a dry run's) in words. */
function estimateText(est) {
  if (!est) return "No estimate (the number of images is unknown: set max_samples).";
  return `Estimate: ${est.device_hours.toPrecision(3)} device-hours (${est.pflops.toPrecision(3)} PFLOP at ${est.device_tflops} ` +
    `TFLOP/s per device, ${est.device_kind}), about ${est.peak_memory_gb.toPrecision(3)} GB per device.`;
}
/** One line of the caller's quotas and usage (GET /v1/usage); why a submission would be refused now. */
function usageText(u) {
  const of = (used, limit, what) => (limit === null || limit === undefined ? `${used} ${what} (no limit)` : `${used} of ${limit} ${what}`);
  const l = u.limits, n = u.usage;
  const line = `Your quota: ${of(n.active_jobs, l.max_active_jobs, "queued + running jobs")}, ` +
    `${of(n.running_jobs, l.max_running_jobs, "running")}, ${of(n.devices, l.max_devices, "devices")}, ` +
    `${of(n.device_hours.toFixed(2), l.device_hours, "device-hours")} in the last ${l.period_hours} h; fair-share weight ${l.weight ?? 1}`;
  return u.can_submit ? line : `${line}. A new job is refused now: ${u.refusal.detail}`;
}
//: the job list's filters, as GET /v1/jobs names them; they live in the page's URL (#/jobs?tag=paper&sort=name)
const LIST_FILTERS = ["status", "kind", "method", "dataset", "tag", "q", "sort"];
async function renderJobs(params) {
  const status = params.get("status") || params.get("state") || "", kind = params.get("kind") || "";
  const want = Object.fromEntries(LIST_FILTERS.map((f) => [f, f === "status" ? status : params.get(f) || ""]));
  const apply = () => {  // the form's values -> the URL (a link reproduces the view)
    const out = new URLSearchParams();
    for (const f of LIST_FILTERS) { const v = ($(`#filter-${f}`) || {}).value; if (v) out.set(f, v.trim()); }
    go("#/jobs" + (String(out) ? "?" + out : ""));
  };
  const statusSel = h("select", { id: "filter-status", onchange: apply },
    h("option", { value: "" }, "any status"), ...["queued", "running", "succeeded", "failed", "cancelled"].map((s) => h("option", { value: s, selected: s === status }, s)));
  const cat = await catalog();
  const kindSel = h("select", { id: "filter-kind", onchange: apply },
    h("option", { value: "" }, "any kind"), ...cat.job_kinds.map((k) => h("option", { value: k, selected: k === kind }, k)));
  const text = (f, placeholder, size) => h("input", { id: `filter-${f}`, placeholder, value: want[f], size, onchange: apply });
  const sortSel = h("select", { id: "filter-sort", onchange: apply }, ...[["", "newest first"], ["+created_at", "oldest first"],
    ["name", "name"], ["kind", "kind"], ["status", "status"], ["-updated_at", "last updated"], ["top1:4w4a", "best 4w4a top-1"],
    ["top1:2w4a", "best 2w4a top-1"], ["top1:fp", "best fp top-1"]].map(([v, t]) => h("option", { value: v, selected: v === want.sort }, t)));
  const tbody = h("tbody", { id: "jobs-body" });
  main.replaceChildren(
    h("h1", {}, "Jobs"),
    h("p", { id: "usage", class: "muted" }),
    h("form", { class: "filters", id: "filters", onsubmit: (e) => { e.preventDefault(); apply(); } }, statusSel, kindSel,
      text("method", "method", 8), text("dataset", "dataset", 10), text("tag", "tag", 10), text("q", "search name, notes, id", 22), sortSel,
      h("a", { class: "button", href: "#/submit?kind=pretrain" }, "New pretrain job"), ...compareControls()),
    h("table", { id: "jobs-table" }, h("thead", {}, h("tr", {}, h("th", { title: "select to compare" }, ""), ...["id", "name", "kind", "method", "backbone", "dataset", "status", "progress", "tags", "created", "duration"].map((c) => h("th", {}, c)))), tbody),
    h("p", { id: "jobs-empty", class: "muted", hidden: true }, LIST_FILTERS.some((f) => want[f]) ? "No jobs match these filters." : "No jobs yet."),
    h("div", { class: "actions", id: "pager" }));
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  const PAGE = Math.min(1000, Math.max(1, parseInt(params.get("limit") || "100", 10) || 100));  // jobs per page
  const pageLink = (to, text, id) => {  // the same filters, another page
    const p = new URLSearchParams(); for (const f of LIST_FILTERS) if (want[f]) p.set(f, want[f]);
    if (PAGE !== 100) p.set("limit", String(PAGE));
    if (to > 0) p.set("offset", String(to));
    return h("a", { class: "button secondary", id, href: "#/jobs" + (String(p) ? "?" + p : "") }, text);
  };
  const watched = new Set();
  const rowOf = (job) => {
    const c = cfg(job);
    return h("tr", { dataset: { jobId: job.id } }, selectCell(job),
      h("td", {}, h("a", { class: "mono", href: `#/job/${job.id}` }, job.id.slice(0, 8))),
      h("td", { class: "name", title: job.name || null }, job.name || ""),  // user-written text: always a text node, never markup
      h("td", {}, job.kind), h("td", {}, c.method || ""), h("td", {}, c.backbone || ""), h("td", {}, c.dataset || ""),
      h("td", { class: "st" }, statusCell(job)), h("td", { class: "pg" }, progressCell(job)),
      h("td", { class: "tags" }, ...(job.tags || []).map((t) => h("a", { class: "tag", href: `#/jobs?tag=${encodeURIComponent(t)}` }, t))),
      h("td", {}, fmtTime(job.created_at)), h("td", { class: "du" }, duration(job)));
  };
  const update = (job) => {
    const tr = tbody.querySelector(`tr[data-job-id="${job.id}"]`);
    if (!tr) return;
    const full = Object.assign(JSON.parse(tr.dataset.job || "{}"), job);
    tr.dataset.job = JSON.stringify(full);
    tr.querySelector(".st").replaceChildren(statusCell(full));
    tr.querySelector(".pg").replaceChildren(progressCell(full));
    tr.querySelector(".du").textContent = duration(full);
  };
  const load = async () => {
    const q = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
    for (const f of LIST_FILTERS) if (want[f]) q.set(f, want[f]);
    getJSON("/v1/usage").then((u) => { $("#usage").textContent = usageText(u); }).catch(() => {});
    const page = await getJSON("/v1/jobs?" + q);
    tbody.replaceChildren(...page.items.map((j) => { const tr = rowOf(j); tr.dataset.job = JSON.stringify(j); return tr; }));
    $("#jobs-empty").hidden = page.items.length > 0;
    $("#pager").replaceChildren(...[offset > 0 ? pageLink(Math.max(0, offset - PAGE), "← previous page", "page-prev") : null,
      page.next_offset !== null ? pageLink(page.next_offset, "next page →", "page-next") : null].filter(Boolean));
    for (const j of page.items) {
      if (!TERMINAL.includes(j.status) && !watched.has(j.id)) { watched.add(j.id); watchJob(j.id, update); }
    }
  };
  await load();
  later(() => load().catch(() => {}), 10000); // new jobs; the live rows update through their streams
}

// -- one job ---------------------------------------------------------------------------------------
async function renderJob(id) {
  const job = await getJSON(`/v1/jobs/${encodeURIComponent(id)}`);
  const head = h("div", { id: "job-head" });
  const drawHead = (j) => {
    head.replaceChildren(...[  // (replaceChildren writes a null child as the text "null")
      h("dl", { class: "kv" },
        h("dt", {}, "name"), h("dd", { id: "job-name" }, j.name || ""),  // user-written: text nodes only
        h("dt", {}, "tags"), h("dd", { id: "job-tags" }, ...(j.tags || []).map((t) => h("a", { class: "tag", href: `#/jobs?tag=${encodeURIComponent(t)}` }, t))),
        j.notes ? [h("dt", {}, "notes"), h("dd", { id: "job-notes", class: "notes" }, j.notes)] : null,
        j.priority ? [h("dt", {}, "priority"), h("dd", { id: "job-priority" }, `${j.priority} (among your queued jobs, higher first)`)] : null,
        h("dt", {}, "status"), h("dd", {}, statusCell(j)),
        h("dt", {}, "progress"), h("dd", {}, progressCell(j), h("div", { class: "muted", id: "progress-detail" }, progressDetail(j))),
        h("dt", {}, "attempts"), h("dd", {}, `${j.attempts} of ${j.max_attempts ?? "?"}`),
        h("dt", {}, "created"), h("dd", {}, fmtTime(j.created_at)),
        h("dt", {}, "duration"), h("dd", { id: "job-duration" }, duration(j)),
        j.source_job ? [h("dt", {}, "source job"), h("dd", {}, h("a", { href: `#/job/${j.source_job}`, class: "mono" }, j.source_job))] : null),
      j.error ? h("div", { class: "errorbox", id: "job-error" }, h("b", {}, j.error.code), j.error.field ? ` (field ${j.error.field})` : "", ": ", j.error.message) : null,
    ].filter(Boolean));
  };
  drawHead(job);
  const c = cfg(job);
  const actions = h("div", { class: "actions" });
  const cancel = h("button", { class: "danger", id: "cancel", disabled: TERMINAL.includes(job.status), onclick: async () => {
    try { drawHead(await getJSON(`/v1/jobs/${id}/cancel`, { method: "POST" })); toast("cancel requested"); } catch (e) { toast(e.message); }
  } }, "Cancel");
  actions.append(cancel);
  if (job.kind === "pretrain") actions.append(h("a", { class: "button secondary", href: `#/submit?kind=eval&source_job=${id}` }, "Evaluate…"),
    h("a", { class: "button secondary", href: `#/submit?kind=finetune&source_job=${id}` }, "Fine-tune…"));
  if (job.kind === "eval") actions.append(h("a", { class: "button secondary", href: `#/submit?kind=distill&source_job=${id}` }, "Distill…"),
    h("a", { class: "button secondary", href: `#/compare?jobs=${id}` }, "Compare…"));
  if (job.kind === "pretrain" || job.kind === "eval") actions.append(h("a", { class: "button secondary", href: `#/submit?kind=export&source_job=${id}` }, "Export…"));
  actions.append(h("a", { class: "button secondary", id: "clone", href: `#/submit?kind=${job.kind}&from=${encodeURIComponent(id)}` }, "Clone…"));

  // name, tags and notes: edited in place (PATCH /v1/jobs/{id}); a 422 shows at the field it names
  const labelErr = h("p", { class: "error", id: "labels-error", role: "alert" });
  const labelsForm = h("form", { id: "labels-form", class: "jobform", onsubmit: async (e) => {
    e.preventDefault();
    labelErr.textContent = "";
    const tags = $("#edit-tags", labelsForm).value.split(",").map((t) => t.trim()).filter(Boolean);
    const body = { name: $("#edit-name", labelsForm).value.trim() || null, tags, notes: $("#edit-notes", labelsForm).value || null };
    try { Object.assign(job, await getJSON(`/v1/jobs/${id}`, { method: "PATCH", json: body })); drawHead(job); toast("saved"); }
    catch (err) { if (!(err instanceof ApiError) || err.status !== 401) labelErr.textContent = err.message; }
  } },
    fieldRow("name", h("input", { id: "edit-name", value: job.name || "", maxlength: 200 }), "up to 200 characters"),
    fieldRow("tags", h("input", { id: "edit-tags", value: (job.tags || []).join(", ") }), "comma-separated; letters, digits and _ . : / = + - @ #"),
    fieldRow("notes", h("textarea", { id: "edit-notes", rows: 3 }, job.notes || ""), ""),
    labelErr, h("button", { type: "submit", class: "secondary" }, "Save"));
  const charts = h("div", { class: "grid", id: "charts" });
  const curvesNote = h("p", { class: "muted", id: "curves-note" });
  const logs = h("pre", { id: "log" }, "");
  const extra = h("div", { id: "job-extra" });
  fill(main,
    h("h1", {}, `${job.kind} `, h("span", { class: "mono" }, id), c.method ? h("span", { class: "muted" }, ` · ${c.method} · ${c.backbone || ""} · ${c.dataset || ""}`) : null),
    job.spec && job.spec.estimate ? h("p", { class: "muted", id: "cost" }, estimateText(job.spec.estimate) +
      (job.summary && job.summary.cost ? ` Actual: ${job.summary.cost.actual_device_hours.toPrecision(3)} device-hours.` : "")) : null,
    h("div", { class: "card" }, head, actions, h("details", { id: "labels" }, h("summary", {}, "Name, tags and notes"), labelsForm)),
    h("div", { id: "job-lineage" }),
    ...(job.kind === "export" ? [] : [h("h2", {}, "Training curves"), curvesNote, charts]),
    extra,
    h("h2", {}, "Log (last 200 lines)"), logs,
    h("div", { id: "job-reuse" }));
  lineageSection(job).then((el) => $("#job-lineage")?.replaceChildren(el)).catch((e) => { if (e.name !== "AbortError") console.warn("lineage", e); });
  reuseSection(job).then((el) => $("#job-reuse")?.replaceChildren(el)).catch((e) => { if (e.name !== "AbortError") console.warn("reproduce", e); });

  // the curves: x is the optimisation step the sample was taken at (an eval job: each bit-width's
  // probe is its own line over that probe's epochs); a chart appears once it has samples
  const samples = [];
  let after = 0;
  const plots = {};
  const CURVES = [["loss", (m) => m.loss], ["lr", (m) => m.lr], ["images_per_s", (m) => m.images_per_s],
    ["z_std", (m) => (m.metrics ? m.metrics.z_std ?? null : null)], ["test_top1", (m) => (m.metrics ? m.metrics.test_top1 ?? null : null)]];
  const curveSeries = (get) => {
    if (job.kind === "eval") {  // one line per bit-width's probe, x = the epoch of that probe
      const bits = c.bits || [], per = c.epochs || 1, lines = new Map();
      for (const m of samples) {
        const y = get(m); if (y === null || y === undefined) continue;
        const bi = m.metrics && m.metrics.bits_index !== undefined ? m.metrics.bits_index : Math.floor((m.epoch - 1) / per);
        if (!lines.has(bi)) lines.set(bi, new Map());
        lines.get(bi).set(m.epoch - bi * per, y);
      }
      const xs = [...new Set([...lines.values()].flatMap((l) => [...l.keys()]))].sort((a, b) => a - b);
      return { xs, xlabel: "epoch (of each bit-width's probe)", lines: [...lines.entries()].sort((a, b) => a[0] - b[0])
        .map(([bi, l]) => ({ label: bits[bi] ?? `probe ${bi + 1}`, ys: xs.map((x) => (l.has(x) ? l.get(x) : null)) })) };
    }
    const pts = samples.map((m) => [m.step, get(m)]).filter(([, y]) => y !== null && y !== undefined);
    const byStep = new Map(pts);  // a step reported twice (a retried attempt): the later sample
    const xs = [...byStep.keys()].sort((a, b) => a - b);
    return { xs, xlabel: "step", lines: [{ label: null, ys: xs.map((x) => byStep.get(x)) }] };
  };
  const drawCharts = () => {
    let shown = 0;
    for (const [name, get] of CURVES) {
      const cs = curveSeries(get);
      const points = cs.lines.reduce((n, l) => n + l.ys.filter((v) => v !== null).length, 0);
      if (!points) { if (plots[name]) { plots[name].box.remove(); delete plots[name]; } continue; }
      shown++;
      if (!plots[name]) { const box = h("div", { class: "chart", id: `chart-${name}` }); charts.append(box); plots[name] = { box, plot: null, n: 0 }; }
      const p = plots[name];
      p.box.dataset.points = String(points);
      p.box.dataset.series = String(cs.lines.length);
      p.box.dataset.x = cs.xs.join(",");
      const data = [cs.xs, ...cs.lines.map((l) => l.ys)];
      if (!p.plot || p.n !== cs.lines.length) {
        p.box.replaceChildren();
        p.plot = new uPlot({ title: name, width: 400, height: 220, scales: { x: { time: false } },
          series: [{ label: cs.xlabel.split(" ")[0] }, ...cs.lines.map((l, k) => ({ label: l.label || name, stroke: COLORS[k % COLORS.length], width: 1.5, spanGaps: true }))],
          axes: [{ label: cs.xlabel, values: tickValues(p.box, "x"), incrs: INT_INCRS }, { values: tickValues(p.box, "y"), size: axisSize }] }, data, p.box);
        p.n = cs.lines.length;
      } else p.plot.setData(data);
    }
    curvesNote.hidden = shown > 0;
    curvesNote.textContent = job.kind === "export" ? "An export job trains nothing: it writes files (below)."
      : TERMINAL.includes(job.status) ? "This job reported no training samples." : "No samples yet.";
  };
  const loadMetrics = async () => {  // the history since the last load, at most CHART_POINTS samples (extremes kept; runs.js)
    const page = await getJSON(`/v1/jobs/${id}/metrics?after=${after}&max_points=${CHART_POINTS}`);
    for (const m of page.items) { samples.push(m); after = m.id; }
    drawCharts();
  };
  const loadLog = async () => { const t = await (await api(`/v1/jobs/${id}/logs?tail=200`)).text(); logs.textContent = t || "(no output yet)"; logs.scrollTop = logs.scrollHeight; };
  const loadExtra = async (j) => {
    const parts = [];
    if (j.status === "succeeded" && (j.kind === "eval" || j.kind === "distill")) parts.push(await resultsSection([j.id]));
    if (j.status === "succeeded" && j.kind === "finetune") parts.push(await finetuneSection(j));
    if (j.kind === "export") { parts.push(await exportSection(j)); extra.replaceChildren(...parts); return; }
    if (j.summary && j.summary.bit_pairs) {  // SSQL methods: how often each (w, a) pair was drawn
      const pairs = Object.entries(j.summary.bit_pairs);
      const total = pairs.reduce((n, [, c]) => n + c, 0) || 1;
      parts.push(h("h2", {}, "Bit pairs drawn"), h("table", { id: "bit-pairs" },
        h("tr", {}, h("th", {}, "pair"), h("th", {}, "steps"), h("th", {}, "share")),
        ...pairs.map(([p, c]) => h("tr", {}, h("td", { class: "mono" }, p), h("td", {}, String(c)), h("td", {}, `${(100 * c / total).toFixed(1)}%`)))));
    }
    parts.push(await checkpointsSection(j.id));
    extra.replaceChildren(...parts);
  };
  await Promise.all([loadMetrics(), loadLog(), loadExtra(job)]);
  if (!TERMINAL.includes(job.status)) {
    later(() => { const d = $("#job-duration"); if (d && job.started_at && !job.finished_at) d.textContent = duration(job); }, 1000);
    let ended = false;
    watchJob(id, async (j) => {
      const full = Object.assign(job, j);
      drawHead(full);
      if (TERMINAL.includes(j.status) && !ended) {
        ended = true; cancel.disabled = true;
        await Promise.all([loadMetrics(), loadLog(), loadExtra(full)]).catch(() => {});
      }
    });
    later(() => { if (!ended) { loadMetrics().catch(() => {}); loadLog().catch(() => {}); } }, 2000);
  }
}

// -- checkpoints -----------------------------------------------------------------------------------
async function sha256Hex(buf) {
  const d = await crypto.subtle.digest("SHA-256", buf);
  return Array.from(new Uint8Array(d)).map((b) => b.toString(16).padStart(2, "0")).join("");
}
async function download(jobId, ck, button) {
  button.disabled = true; button.textContent = "downloading…";
  try {
    const r = await api(`/v1/jobs/${jobId}/checkpoints/${ck.bits}?format=${ck.format}&redirect=false`);  // served here: the page may fetch only its own origin
    const blob = await r.blob();
    const got = await sha256Hex(await blob.arrayBuffer());
    if (got !== ck.sha256) throw new Error(`sha256 mismatch: got ${got}, expected ${ck.sha256}`);
    const name = (r.headers.get("content-disposition") || "").match(/filename="?([^";]+)"?/)?.[1] || `${jobId}-${ck.bits}-${ck.format}`;
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: name }); document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    button.textContent = "sha256 verified ✓";
  } catch (e) { button.textContent = "failed"; toast(e.message); }
  finally { setTimeout(() => { button.disabled = false; button.textContent = "download"; }, 4000); }
}
async function checkpointsSection(jobId) {
  const rows = await getJSON(`/v1/jobs/${jobId}/checkpoints`);
  if (!rows.length) return h("div", {});
  const fp32 = rows.find((r) => r.bits === "fp" && r.format === "torch") || rows.find((r) => r.bits === "fp");
  return h("div", {}, h("h2", {}, "Checkpoints"), checkpointsTable(jobId, rows, fp32));
}
function checkpointsTable(jobId, rows, fp32) {
  return h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ...["bits", "format", "size", "vs FP32", "sha256", "produced by", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, ...rows.map((ck) => {
        const btn = h("button", { class: "secondary dl", dataset: { bits: ck.bits, format: ck.format, sha256: ck.sha256 } }, "download");
        btn.addEventListener("click", () => download(jobId, ck, btn));
        return h("tr", {}, h("td", {}, ck.bits), h("td", {}, ck.format), h("td", { class: "num" }, fmtBytes(ck.bytes)),
          h("td", { class: "num" }, fp32 ? `${((100 * ck.bytes) / fp32.bytes).toFixed(1)}%` : ""),
          h("td", { class: "mono", title: ck.sha256 }, ck.sha256.slice(0, 16) + "…"),
          h("td", { class: "mono" }, ck.produced_by ? h("a", { href: `#/job/${ck.produced_by}` }, ck.produced_by.slice(0, 8)) : ""), h("td", {}, btn));
      })));
}

// -- fine-tuning: top-1 per epoch against the PTQ + linear-probe baseline ---------------------------
async function finetuneSection(job) {
  const { rows } = await getJSON(`/v1/jobs/${job.id}/results`);
  const r = rows[0] || {};
  const curve = r.curve || [];
  const box = h("div", { class: "chart", id: "finetune-chart", dataset: { points: String(curve.filter((e) => e.test_top1 != null).length) } });
  const kv = [["bits", r.bits], ["quantizer", r.quantizer], ["dataset", r.dataset], ["top-1 (fine-tuned)", fmtNum(r.top1)],
    ["PTQ + linear probe top-1", fmtNum(r.ptq_linear_top1)], ["gain over PTQ + probe", r.gain_over_ptq_linear == null ? "" : `${r.gain_over_ptq_linear > 0 ? "+" : ""}${fmtNum(r.gain_over_ptq_linear)}`],
    ["top-1 before fine-tuning", fmtNum(r.start_top1)], ["epochs", r.epochs], ["act ranges", r.act_ranges]];
  const section = h("div", { id: "finetune-results" }, h("h2", {}, "Fine-tuning: test top-1 per epoch"), box,
    h("dl", { class: "kv card", id: "finetune-summary" }, ...kv.filter(([, v]) => v !== undefined && v !== null && v !== "")
      .flatMap(([k, v]) => [h("dt", {}, k), h("dd", { dataset: { key: k } }, String(v))])));
  if (!curve.length) { box.append(h("div", { class: "empty" }, "no per-epoch test accuracy in this run's results")); return section; }
  const xs = curve.map((e) => e.epoch);
  const ser = [{ label: "epoch" }, { label: "test top-1 (fine-tuning)", stroke: COLORS[0], width: 2, points: { show: true, size: 6 }, spanGaps: true }];
  const data = [xs, curve.map((e) => e.test_top1 ?? null)];
  if (r.ptq_linear_top1 != null) { ser.push({ label: `PTQ + linear probe (${fmtNum(r.ptq_linear_top1)})`, stroke: COLORS[1], width: 1.5, dash: [6, 4], points: { show: false } }); data.push(xs.map(() => r.ptq_linear_top1)); }
  if (r.start_top1 != null) { ser.push({ label: `before fine-tuning (${fmtNum(r.start_top1)})`, stroke: COLORS[6], width: 1, dash: [2, 3], points: { show: false } }); data.push(xs.map(() => r.start_top1)); }
  box.dataset.series = String(ser.length - 1);
  requestAnimationFrame(() => new uPlot({ width: Math.min(900, main.clientWidth - 40), height: 300, scales: { x: { time: false } }, series: ser,
    axes: [{ label: "epoch", values: tickValues(box, "x"), incrs: INT_INCRS }, { label: "top-1 (%)", values: tickValues(box, "y"), size: axisSize }] }, data, box));
  return section;
}

// -- an export job: the files it wrote (served under its source job's id) --------------------------
async function exportSection(job) {
  const src = job.source_job;
  const files = (job.summary && job.summary.files) || [];
  const section = h("div", { id: "export-files" }, h("h2", {}, "Files written"),
    h("p", {}, "An export job's files are served under the job it exported: ", h("a", { class: "mono", href: `#/job/${src}` }, src), "."));
  if (!src) return section;
  let rows = [];
  try { rows = (await getJSON(`/v1/jobs/${src}/checkpoints`)).filter((r) => r.produced_by === job.id); } catch { /* source gone */ }
  if (!rows.length) {
    section.append(h("p", { class: "muted" }, job.status === "succeeded" ? "No files are listed for this export." :
      `Not written yet (status ${job.status}); asked for: ${(cfg(job).bits || []).join(", ")} as ${(cfg(job).formats || []).join(", ")}.`));
    return section;
  }
  section.append(checkpointsTable(src, rows, null, files));
  return section;
}

// -- results: top-1 vs bit-width -------------------------------------------------------------------
function orderBits(all) {
  const uniq = [...new Set(all)];
  const key = (b) => { const i = PAPER_BITS.indexOf(b); if (i >= 0) return [0, i, 0]; const m = /^(\d)w(\d)a$/.exec(b); return m ? [1, -m[1], -m[2]] : [2, 0, 0]; };
  return uniq.sort((a, b) => { const ka = key(a), kb = key(b); return ka[0] - kb[0] || ka[1] - kb[1] || ka[2] - kb[2]; });
}
/** A series' name: the job's name (if it has one), the pretraining method, how the job measured
 * (calibration and probe, or the quantizer), the job and the pretrain it came from, e.g.
 * "r18 sweep · ssql · minmax · linear probe · eval 7b693390 · pretrain efaa03a9". */
async function jobLabel(job) {
  const c = cfg(job);
  const pretrainId = (job.spec && job.spec.pretrain_job) || job.source_job;
  let method = job.kind === "pretrain" ? c.method : null;
  if (pretrainId && !method) { try { method = cfg(await getJSON(`/v1/jobs/${pretrainId}`)).method; } catch { /* not shown */ } }
  const how = job.kind === "eval" ? (c.protocol === "knn" ? ["kNN"] : [c.calibration || "minmax", `${c.probe || "linear"} probe`])
    : job.kind === "finetune" || job.kind === "distill" ? [`${job.kind} ${c.quantizer || ""}`.trim()] : [];
  return [job.name, method || "?", ...how, `${job.kind} ${job.id.slice(0, 8)}`, pretrainId ? `pretrain ${pretrainId.slice(0, 8)}` : null].filter(Boolean).join(" · ");
}
/** The chart (one line per job over the quantized bit-widths, each job's FP as a dashed line) and the table. */
async function resultsSection(jobIds) {
  const jobs = await Promise.all(jobIds.map(async (id) => {
    const [job, res] = await Promise.all([getJSON(`/v1/jobs/${id}`), getJSON(`/v1/jobs/${id}/results`)]);
    return { job, rows: res.rows, label: await jobLabel(job) };
  }));
  const allBits = orderBits(jobs.flatMap((j) => j.rows.map((r) => r.bits)));
  const xs = allBits.filter((b) => b !== "fp");
  const box = h("div", { class: "chart", id: "results-chart" });
  const table = h("table", { id: "results-table" },
    h("thead", {}, h("tr", {}, h("th", {}, "bits"), ...jobs.map((j) => h("th", { title: j.job.id }, j.label)))),
    h("tbody", {}, ...allBits.map((b) => h("tr", {}, h("td", {}, b), ...jobs.map((j) => {
      const r = j.rows.find((x) => x.bits === b);
      return h("td", { class: "num" }, r && r.top1 !== null ? fmtNum(r.top1) : "");
    })))));
  const section = h("div", {}, h("h2", {}, "Results: top-1 vs bit-width"), box, table);
  const pareto = paretoSection(jobs);  // pareto.js: top-1 vs model size, where rows carry their size
  if (pareto) section.append(pareto);
  const data = [xs.map((_, i) => i)];
  const ser = [{ label: "bits" }];
  let points = 0;
  jobs.forEach((j, k) => {
    const color = COLORS[k % COLORS.length];
    const at = Object.fromEntries(j.rows.filter((r) => r.top1 !== null).map((r) => [r.bits, r.top1]));
    const ys = xs.map((b) => (b in at ? at[b] : null));
    points += ys.filter((v) => v !== null).length;
    data.push(ys); ser.push({ label: j.label, stroke: color, width: 2, points: { show: true, size: 7 } });
    if ("fp" in at) { data.push(xs.map(() => at.fp)); ser.push({ label: `${j.label} fp`, stroke: color, width: 1, dash: [6, 4], points: { show: false } }); }
  });
  box.dataset.points = String(points);
  box.dataset.series = String(jobs.length);
  box.dataset.bits = xs.join(",");
  if (!xs.length) { box.append(h("div", { class: "empty" }, "no quantized bit-widths in these results")); return section; }
  requestAnimationFrame(() => {
    new uPlot({ width: Math.min(900, main.clientWidth - 40), height: 320, scales: { x: { time: false, range: [-0.3, xs.length - 0.7] } },
      series: ser, axes: [{ label: "bit-width", splits: () => xs.map((_, i) => i), values: (_u, splits) => splits.map((i) => xs[i] ?? "") },
        { label: "top-1 (%)", values: tickValues(box, "y"), size: axisSize }] }, data, box);
  });
  return section;
}
// -- submit form, generated from /v1/catalog and the request schemas -------------------------------
const MODEL = { pretrain: "PretrainRequest", eval: "EvalRequest", distill: "DistillRequest", finetune: "FinetuneRequest", export: "ExportRequest" };
//: shown first (the rest under "more options"); every field comes from the schema and the catalog
const FIRST = ["name", "tags", "source_job", "method", "backbone", "dataset", "bits", "quantizer", "formats", "epochs", "batch_size", "width", "image_size", "max_samples", "lr", "export_bits"];
function choicesFor(name, kind, cat, prop) {
  if (name === "method") return Object.keys(cat.methods);
  if (name === "backbone") return cat.backbones;
  if (name === "dataset") return cat.datasets.filter((d) => !d.includes("<"));
  if (name === "quantizer") return cat.quantizers;
  if (name === "protocol") return cat.eval_protocols;
  if (name === "path") return cat.eval_paths;
  if (name === "probe") return cat.eval_probes;
  if (name === "calibration") return cat.calibrations;
  if (name === "calib_weights") return cat.calib_weights;
  if (name === "preset") return Object.keys(cat.presets);
  if (cat.quantizer_behaviours[name]) return cat.quantizer_behaviours[name];
  if (name === "bits") return kind === "distill" ? cat.bits.paper_set.filter((b) => b !== "fp") : cat.bits.paper_set;  // finetune: fp allowed
  const e = prop.enum || (prop.anyOf || []).flatMap((x) => x.enum || []);
  return e.length ? e.filter((v) => v !== null) : null;
}
function propType(prop) {
  if (prop.type) return prop.type;
  const t = (prop.anyOf || []).map((x) => x.type).filter((x) => x && x !== "null");
  return t[0] || "string";
}
function fieldRow(name, input, help) {
  return h("div", { class: "field", dataset: { field: name } }, h("label", { for: `f-${name}` }, name), input,
    h("div", {}, h("div", { class: "field-error", id: `err-${name}` }), help ? h("div", { class: "muted" }, help) : null));
}
/** What the server fills in for a field left empty (GET /v1/catalog's ``defaults``); undefined if unknown. */
function defaultOf(cat, kind, name) {
  const d = (cat.defaults || {})[kind === "export" ? "export" : kind] || {};
  return name in d ? d[name] : undefined;
}
const showDefault = (v) => (Array.isArray(v) ? v.join(", ") : String(v));
/** "from 1 to 1000": the range the schema (with this server's limits) states for a number. */
function rangeText(prop) {
  const lo = prop.minimum, hi = prop.maximum;
  if (lo !== undefined && hi !== undefined) return `from ${lo} to ${hi}`;
  if (lo !== undefined) return `at least ${lo}`;
  if (hi !== undefined) return `at most ${hi}`;
  return null;
}
function inputFor(name, kind, prop, cat, preset) {
  const type = propType(prop);
  const multi = (name === "bits" && (kind === "eval" || kind === "export")) || name === "export_bits" || name === "formats";
  const dflt = defaultOf(cat, kind, name);
  if (multi) {
    const opts = name === "formats" ? cat.export_formats : cat.bits.paper_set;
    const def = preset !== undefined ? preset : Array.isArray(dflt) ? dflt : name === "export_bits" ? cat.default_export_bits : name === "formats" ? ["safetensors"] : ["fp", "8w8a", "4w4a", "2w4a"];
    return h("div", { class: "checks", id: `f-${name}`, dataset: { kind: "multi" } }, ...opts.map((b) => h("label", {}, h("input", { type: "checkbox", name, value: b, checked: def.includes(b) }), " ", b)));
  }
  const choices = choicesFor(name, kind, cat, prop);
  const defText = dflt === undefined ? "(default)" : dflt === null ? "(default: not set)" : `(default: ${showDefault(dflt)})`;
  if (choices) return h("select", { id: `f-${name}`, name }, h("option", { value: "" }, defText), ...choices.map((c) => h("option", { value: c, selected: preset === c }, c)));
  if (type === "boolean") return h("select", { id: `f-${name}`, name, dataset: { type } }, h("option", { value: "" }, defText), h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
  const attrs = { id: `f-${name}`, name, dataset: { type }, value: preset ?? "",
    placeholder: dflt === undefined || dflt === null ? (dflt === null ? "default: not set" : null) : `default ${showDefault(dflt)}` };
  if (type === "integer" || type === "number") Object.assign(attrs, { type: "number", step: type === "integer" ? "1" : "any", min: prop.minimum, max: prop.maximum });
  else if (type === "array") attrs.placeholder = (attrs.placeholder ? attrs.placeholder + "; " : "") + "comma-separated";
  return h("input", attrs);
}
function readForm(form) {
  const body = {};
  for (const el of form.querySelectorAll("[data-kind=multi]")) body[el.id.slice(2)] = [...el.querySelectorAll("input:checked")].map((i) => i.value);
  for (const el of form.querySelectorAll("input[name]:not([type=checkbox]), select[name]")) {
    const v = el.value.trim();
    if (v === "") continue;
    const t = el.dataset.type;
    if (t === "integer" || t === "number") body[el.name] = Number(v);
    else if (t === "boolean") body[el.name] = v === "true";
    else if (t === "array") body[el.name] = v.split(",").map((x) => x.trim()).filter(Boolean).map((x) => (el.name !== "tags" && /^-?\d+(\.\d+)?$/.test(x) ? Number(x) : x));
    else body[el.name] = v;
  }
  if (form.dataset.carry) {  // a clone's fields the form has no input for (runs.js prefillFromJob)
    const carry = JSON.parse(form.dataset.carry);
    for (const [k, v] of Object.entries(carry)) if (!(k in body)) body[k] = v;
  }
  return body;
}
function showErrors(form, err) {
  const general = $("#form-error", form);
  const detail = err.body && err.body.detail;
  if (!Array.isArray(detail)) { general.textContent = err.message; return; }
  const unplaced = [];
  for (const d of detail) {
    const loc = d.loc || [];
    const name = loc[0] === "body" ? loc[1] : loc[loc.length - 1];
    const row = form.querySelector(`.field[data-field="${name}"]`);
    if (row) { row.classList.add("invalid"); $(".field-error", row).textContent = d.msg; row.closest("details")?.setAttribute("open", ""); }
    else unplaced.push(`${loc.slice(1).join(".") || "body"}: ${d.msg}`);
  }
  general.textContent = unplaced.join("; ");
}
async function renderSubmit(params) {
  const kind = params.get("kind") || "pretrain";
  const source = params.get("source_job") || "";
  const [cat, doc] = await Promise.all([catalog(), openapi()]);
  const props = { ...((doc.components.schemas[MODEL[kind]] || {}).properties || {}) };
  delete props.kind; delete props.method_options;
  const names = Object.keys(props).sort((a, b) => (FIRST.includes(a) ? FIRST.indexOf(a) : 99) - (FIRST.includes(b) ? FIRST.indexOf(b) : 99));
  const first = [], more = [];
  if (kind === "export") first.push(fieldRow("source_job", h("input", { id: "f-source_job", name: "source_job", value: source, "data-type": "string" })));
  for (const name of names) {
    const preset = name === "source_job" ? source : undefined;
    const help = [props[name].description, rangeText(props[name])].filter(Boolean).join("; ");
    const row = fieldRow(name, inputFor(name, kind, props[name], cat, preset), help);
    (FIRST.includes(name) ? first : more).push(row);
  }
  const options = h("div", { id: "method-options" });
  const form = h("form", { class: "jobform card", id: "submit-form", novalidate: true },
    h("div", { class: "kinds actions" }, ...["pretrain", "eval", "distill", "finetune", "export"].map((k) => h("a", { class: "button" + (k === kind ? "" : " secondary"), href: `#/submit?kind=${k}${source && k !== "pretrain" ? "&source_job=" + source : ""}` }, k))),
    ...first, options, more.length ? h("details", {}, h("summary", {}, "more options"), ...more) : null,
    h("p", { class: "error", id: "form-error", role: "alert" }),
    h("p", { class: "muted", id: "estimate" }),
    h("button", { type: "submit", id: "submit" }, `Submit ${kind} job`),
    kind === "export" ? null : h("button", { type: "button", id: "estimate-button", class: "secondary" }, "Estimate cost"));
  const method = $("#f-method", form);
  const drawOptions = () => {
    const m = method && method.value ? cat.methods[method.value] : null;
    options.replaceChildren(...(m ? Object.entries(m.options).map(([name, def]) =>
      fieldRow(name, h("input", { id: `f-${name}`, name, placeholder: def === null ? "(default)" : String(def), "data-type": typeof def === "number" ? (Number.isInteger(def) ? "integer" : "number") : typeof def === "boolean" ? "boolean" : "number" }), `${method.value} option`)) : []));
  };
  if (method) method.addEventListener("change", drawOptions);
  $("#estimate-button", form)?.addEventListener("click", async () => {  // POST /v1/jobs?dry_run=1: nothing queued
    form.querySelectorAll(".field.invalid").forEach((r) => r.classList.remove("invalid"));
    form.querySelectorAll(".field-error").forEach((r) => (r.textContent = ""));
    $("#form-error", form).textContent = ""; $("#estimate", form).textContent = "";
    try {
      const answer = await getJSON("/v1/jobs?dry_run=1", { method: "POST", json: { kind, ...readForm(form) } });
      $("#estimate", form).textContent = estimateText(answer.estimate) + (answer.quota ? ` It would be refused now: ${answer.quota.detail}` : "");
    } catch (err) { if (!(err instanceof ApiError) || err.status !== 401) showErrors(form, err); }
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    form.querySelectorAll(".field.invalid").forEach((r) => r.classList.remove("invalid"));
    form.querySelectorAll(".field-error").forEach((r) => (r.textContent = ""));
    $("#form-error", form).textContent = "";
    const body = readForm(form);
    const btn = $("#submit", form); btn.disabled = true;
    try {
      let job;
      const idem = { "Idempotency-Key": crypto.randomUUID ? crypto.randomUUID() : String(Math.random()) };
      if (kind === "export") {
        const src = body.source_job; delete body.source_job;
        job = await getJSON(`/v1/jobs/${encodeURIComponent(src || "")}/exports`, { method: "POST", json: body, headers: idem });
      } else job = await getJSON("/v1/jobs", { method: "POST", json: { kind, ...body }, headers: idem });
      go(`#/job/${job.id}`);
    } catch (err) { if (!(err instanceof ApiError) || err.status !== 401) showErrors(form, err); }
    finally { btn.disabled = false; }
  });
  await addUploadedDatasets(form, params);  // datasets.js: your ready datasets as upload:<id>
  if (params.get("from")) await prefillFromJob(form, params.get("from"));
  main.replaceChildren(h("h1", {}, `Submit ${/^[aeiou]/.test(kind) ? "an" : "a"} ${kind} job`), form);
}

// -- router ----------------------------------------------------------------------------------------
async function route() {
  view.abort.abort();
  view.timers.forEach(clearInterval);
  view = { abort: new AbortController(), timers: [] };
  if (!apiKey()) { renderSignIn(); return; }
  $("#nav").hidden = false;
  const { parts, params } = parseHash();
  try {
    if (parts[0] === "job" && parts[1]) await renderJob(parts[1]);
    else if (parts[0] === "submit") await renderSubmit(params);
    else if (parts[0] === "compare") await renderCompare(params);
    else if (parts[0] === "status") await renderStatus(params);  // service.js
    else if (parts[0] === "keys") await renderKeys(params);  // service.js
    else if (parts[0] === "datasets") await renderDatasets(params);  // datasets.js
    else await renderJobs(params);
  } catch (e) {
    if (e.name === "AbortError" || (e instanceof ApiError && e.status === 401)) return;
    main.replaceChildren(h("div", { class: "errorbox" }, e.message));
  }
}
$("#signout").addEventListener("click", () => signOut());
// another tab signed in or out: follow it
window.addEventListener("storage", (e) => { if (e.key === KEY || e.key === null) route(); });
window.addEventListener("hashchange", route);
route();
