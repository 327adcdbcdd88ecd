/* Runs you can compare and reuse (issue 18, items 3 and 4): the compare page (curves overlaid,
 * top-1 vs bit-width, CSV of the selection), the jobs list's selection, a job's chain (lineage)
 * and its reuse (the exact spec, the request and the CLI command that make it again, "Clone").
 *
 * Loaded after app.js, whose helpers it uses (h, fill, $, getJSON, api, cfg, COLORS, ...). Like
 * app.js it puts every user-written string (names, tags) in text nodes, never markup. */
"use strict";

//: samples per curve asked of the server (it keeps each line's first and last sample and every
//: series' extremes: api/downsample.py); the full history is in the CSV
const CHART_POINTS = 1500;
const COMPARE_POINTS = 1000;
//: the jobs list's selection (ids) for the compare page: this tab's, kept across filters and pages
const SELECTION = "ssql.compareSelection";
//: chains longer than this are shown folded on a job's page
const LINEAGE_OPEN = 12;

// -- the jobs list's selection ---------------------------------------------------------------------
function selectedJobs() {
  try { const ids = JSON.parse(sessionStorage.getItem(SELECTION) || "[]"); return Array.isArray(ids) ? ids.filter((x) => typeof x === "string") : []; }
  catch { return []; }
}
function setSelected(ids) { sessionStorage.setItem(SELECTION, JSON.stringify(ids)); updateCompareButton(); }
function updateCompareButton() {
  const ids = selectedJobs(), b = $("#compare-selected"), clear = $("#clear-selected");
  if (!b) return;
  b.textContent = `Compare selected (${ids.length})`;
  b.href = ids.length ? "#/compare?jobs=" + ids.map(encodeURIComponent).join(",") : "#/compare";
  b.classList.toggle("secondary", ids.length === 0);
  if (clear) clear.hidden = ids.length === 0;
}
/** The first cell of a job's row: a checkbox that adds it to (or takes it out of) the selection. */
function selectCell(job) {
  const box = h("input", { type: "checkbox", class: "select", value: job.id, title: "select to compare",
    "aria-label": `select job ${job.id.slice(0, 8)} to compare`, checked: selectedJobs().includes(job.id) });
  box.addEventListener("change", () => {
    const ids = selectedJobs().filter((x) => x !== job.id);
    setSelected(box.checked ? [...ids, job.id] : ids);
  });
  return h("td", { class: "sel" }, box);
}
/** "Compare selected (n)" and "clear", for the jobs list's filter bar. */
function compareControls() {
  const clear = h("button", { type: "button", id: "clear-selected", class: "secondary", onclick: () => {
    setSelected([]); document.querySelectorAll("#jobs-body input.select").forEach((b) => (b.checked = false));
  } }, "clear selection");
  const out = [h("a", { class: "button", id: "compare-selected", href: "#/compare" }, "Compare selected"), clear];
  requestAnimationFrame(updateCompareButton);
  return out;
}

// -- compare ---------------------------------------------------------------------------------------
/** A short line of what a job is, for pickers (no user-written text; the name goes beside it). */
function jobSummary(j) {
  const c = cfg(j), bits = Array.isArray(c.bits) ? c.bits.join(",") : c.bits || "";
  if (j.kind === "pretrain") return [c.method, c.backbone, c.dataset].filter(Boolean).join(" · ");
  if (j.kind === "eval") return `${bits} · ${c.protocol === "knn" ? "kNN" : `${c.calibration || "minmax"} · ${c.probe || "linear"} probe`}`;
  if (j.kind === "export") return `${bits} as ${(c.formats || []).join(",")}`;
  return [bits, c.quantizer].filter(Boolean).join(" · ");
}
async function downloadCsv(path, fallbackName, button) {
  const text = button.textContent;
  button.disabled = true;
  try {
    const r = await api(path);
    const blob = await r.blob();
    const name = (r.headers.get("content-disposition") || "").match(/filename="?([^";]+)"?/)?.[1] || fallbackName;
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: name }); document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) { if (!(e instanceof ApiError && e.status === 401)) toast(e.message); }
  finally { button.disabled = false; button.textContent = text; }
}
/** One job's (step, value) pairs of a curve: a step reported twice (a retried attempt) keeps the later sample. */
function stepSeries(samples, get) {
  const byStep = new Map();
  for (const m of samples) { const y = get(m); if (y !== null && y !== undefined) byStep.set(m.step, y); }
  const xs = [...byStep.keys()].sort((a, b) => a - b);
  return [xs, xs.map((x) => byStep.get(x))];
}
const hoverValue = (_u, v) => (v === null || v === undefined ? "–" : Math.abs(v) >= 1e-3 && Math.abs(v) < 1e6 ? Number(v).toPrecision(5) : Number(v).toExponential(3));
/** Loss and lr of every selected job that trains over steps, overlaid (x: step), with the cursor
 * synced between the charts and each series' value at the cursor in the legend. */
async function curvesSection(jobs, labels) {
  const section = h("div", { id: "compare-curves" }, h("h2", {}, "Training curves"));
  const trained = jobs.map((j, k) => ({ j, label: labels[k], color: COLORS[k % COLORS.length] })).filter((x) => x.j.kind !== "eval" && x.j.kind !== "export");
  const skipped = jobs.filter((j) => j.kind === "eval" || j.kind === "export");
  if (skipped.length) section.append(h("p", { class: "muted", id: "curves-skipped" }, `Not drawn here: ${skipped.map((j) => `${j.kind} ${j.id.slice(0, 8)}`).join(", ")} ` +
    "(an eval job's curves are its probes' losses per bit-width, on its own page; an export trains nothing)."));
  if (!trained.length) return section;
  const samples = await Promise.all(trained.map((t) => getJSON(`/v1/jobs/${encodeURIComponent(t.j.id)}/metrics?max_points=${COMPARE_POINTS}`)));
  const grid = h("div", { class: "grid wide" });
  section.append(grid);
  for (const [name, get] of [["loss", (m) => m.loss], ["lr", (m) => m.lr]]) {
    const per = trained.map((t, k) => ({ ...t, xy: stepSeries(samples[k].items, get) })).filter((t) => t.xy[0].length);
    if (!per.length) continue;
    const data = per.length === 1 ? per[0].xy : uPlot.join(per.map((t) => t.xy));
    const box = h("div", { class: "chart", id: `compare-${name}`, dataset: { series: String(per.length), labels: per.map((t) => t.label).join("|"),
      points: String(per.reduce((n, t) => n + t.xy[0].length, 0)) } });
    grid.append(box);
    requestAnimationFrame(() => new uPlot({ title: name, width: Math.max(420, Math.min(640, (main.clientWidth - 60) / 2)), height: 280,
      scales: { x: { time: false } }, cursor: { sync: { key: "ssql-compare" } }, legend: { live: true },
      series: [{ label: "step", value: (_u, v) => (v === null || v === undefined ? "–" : String(v)) },
        ...per.map((t) => ({ label: t.label, stroke: t.color, width: 1.5, spanGaps: true, value: hoverValue }))],
      axes: [{ label: "step", values: tickValues(box, "x"), incrs: INT_INCRS }, { values: tickValues(box, "y"), size: axisSize }] }, data, box));
  }
  return section;
}
async function renderCompare(params) {
  const chosen = [...new Set((params.get("jobs") || "").split(",").map((x) => x.trim()).filter(Boolean))];
  const page = await getJSON("/v1/jobs?status=succeeded&limit=100");
  const rows = page.items.filter((j) => j.kind !== "export");
  const form = h("form", { id: "compare-form" });
  form.append(h("div", { class: "checks" }, ...rows.map((j) => h("div", {}, h("label", {},
    h("input", { type: "checkbox", value: j.id, checked: chosen.includes(j.id) }), " ", h("span", { class: "mono" }, j.id.slice(0, 8)), ` ${j.kind} · ${jobSummary(j)} `,
    j.name ? h("b", { class: "name" }, j.name) : null, " ", ...(j.tags || []).map((t) => h("span", { class: "tag" }, t)), " ",
    h("span", { class: "muted" }, fmtTime(j.created_at)))))), h("button", { type: "submit" }, "Compare"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const ids = [...form.querySelectorAll("input:checked")].map((i) => i.value);
    setSelected(ids);
    go("#/compare?jobs=" + ids.map(encodeURIComponent).join(","));
  });
  main.replaceChildren(h("h1", {}, "Compare jobs"),
    h("p", { class: "muted" }, "Pick jobs here or with the checkboxes of the jobs list: their loss and lr curves are overlaid " +
      "(hover for each job's value), their results drawn as top-1 vs bit-width, and the selection's numbers exported as CSV."),
    h("div", { class: "card" }, rows.length ? form : h("p", { class: "muted" }, "No succeeded jobs yet.")));
  if (!chosen.length) return;
  const jobs = await Promise.all(chosen.map((id) => getJSON(`/v1/jobs/${encodeURIComponent(id)}`)));
  const labels = await Promise.all(jobs.map(jobLabel));
  const q = chosen.map((id) => "job=" + encodeURIComponent(id)).join("&");
  const resultsCsv = h("button", { type: "button", id: "csv-results", class: "secondary" }, "Download results (CSV)");
  const metricsCsv = h("button", { type: "button", id: "csv-metrics", class: "secondary" }, "Download metrics (CSV, every sample)");
  resultsCsv.addEventListener("click", () => downloadCsv(`/v1/compare/results.csv?${q}`, "results.csv", resultsCsv));
  metricsCsv.addEventListener("click", () => downloadCsv(`/v1/compare/metrics.csv?${q}`, "metrics.csv", metricsCsv));
  main.append(h("div", { class: "actions", id: "compare-actions" }, resultsCsv, metricsCsv));
  main.append(await curvesSection(jobs, labels));
  const withResults = jobs.filter((j) => ["eval", "distill", "finetune"].includes(j.kind)).map((j) => j.id);
  if (withResults.length) main.append(await resultsSection(withResults));
  else main.append(h("p", { class: "muted", id: "no-results" }, "None of these jobs has results (top-1 comes from eval, distill and finetune jobs)."));
}

// -- a job's chain ---------------------------------------------------------------------------------
/** The job's chain from its first job (pretrain -> eval / finetune / export -> distill / export),
 * every other job a link; the job itself marked. Only the owner's jobs are listed (the server's). */
async function lineageSection(job) {
  const lin = await getJSON(`/v1/jobs/${encodeURIComponent(job.id)}/lineage`);
  const section = h("div", { id: "lineage" }, h("h2", {}, "Lineage"));
  if (lin.tree.length <= 1 && !lin.parents.length) {
    section.append(h("p", { class: "muted", id: "lineage-empty" }, job.kind === "pretrain" ? "No jobs made from this one yet." : "A job of its own."));
    return section;
  }
  const list = h("ul", { class: "lineage-tree", id: "lineage-tree" }, ...lin.tree.map((n) => {
    const me = n.id === job.id;
    return h("li", { class: me ? "me" : null, style: `padding-left:${(n.depth || 0) * 22}px`, dataset: { jobId: n.id, depth: String(n.depth || 0) } },
      me ? h("b", { class: "mono" }, n.id.slice(0, 8)) : h("a", { class: "mono", href: `#/job/${n.id}` }, n.id.slice(0, 8)), " ",
      h("span", { class: "kind" }, n.kind), " ", h("span", { class: "status " + n.status }, n.status), " ", h("span", { class: "muted" }, n.what),
      n.name ? [" ", h("span", { class: "name" }, n.name)] : null, me ? h("span", { class: "muted" }, " (this job)") : null);
  }));
  const from = lin.parents.length ? h("p", { id: "lineage-parents" }, "Made from: ", ...lin.parents.slice().reverse().flatMap((p, i) =>
    [i ? " → " : null, h("a", { class: "mono", href: `#/job/${p.id}` }, `${p.kind} ${p.id.slice(0, 8)}`)]), " → this job") : null;
  const made = lin.children.length ? h("p", { id: "lineage-children" }, `Made from it: ${lin.children.length}${lin.truncated ? "+" : ""} job(s)`) : null;
  //: a long chain (a pretrain with many evaluations) folds, so the curves stay near the top
  const tree = lin.tree.length > LINEAGE_OPEN ? h("details", { id: "lineage-more" }, h("summary", {}, `The whole chain: ${lin.tree.length} jobs`), list) : list;
  section.append(...[from, made, tree, lin.truncated ? h("p", { class: "muted" }, "(the chain holds more jobs than listed)") : null].filter(Boolean));
  return section;
}

// -- reuse: the exact spec, the request and the command that make the job again --------------------
async function reuseSection(job) {
  const r = await getJSON(`/v1/jobs/${encodeURIComponent(job.id)}/reproduce`);
  const copy = (text, what) => { const b = h("button", { type: "button", class: "secondary copy" }, `Copy ${what}`);
    b.addEventListener("click", async () => { try { await navigator.clipboard.writeText(text); toast(`${what} copied`); } catch { toast("copy failed: select the text"); } });
    return b; };
  return h("div", { id: "reuse" }, h("h2", {}, "Reproduce"),
    h("div", { class: "actions" }, copy(r.cli, "command")),
    h("p", { class: "muted" }, "The command that submits this job again (the fields that differ from the defaults; the same spec):"),
    h("pre", { id: "cli-command", class: "spec" }, r.cli),
    h("p", { class: "muted" }, "From this server, changing fields as you go: ", h("code", { id: "cli-from" }, `${r.cli_from} --set epochs=…`)),
    h("details", { id: "spec-details" }, h("summary", {}, "Spec (exact, as stored)"), h("pre", { class: "spec", id: "spec" }, JSON.stringify(job.spec, null, 2))),
    h("details", { id: "request-details" }, h("summary", {}, `Request body (every field): ${r.method} ${r.path}`),
      h("pre", { class: "spec", id: "request-body" }, JSON.stringify(r.request, null, 2))));
}

// -- clone: the submit form filled with a job's spec -----------------------------------------------
/** Put a value into the form's field ``name``; false when the form has no field that can hold it. */
function setField(form, name, value) {
  const el = form.querySelector(`#f-${CSS.escape(name)}`);
  if (!el) return false;
  if (el.dataset.kind === "multi") {
    const boxes = [...el.querySelectorAll("input[type=checkbox]")];
    if (!Array.isArray(value) || !value.every((v) => boxes.some((b) => b.value === v))) return false;
    boxes.forEach((b) => (b.checked = value.includes(b.value)));
    return true;
  }
  if (el.tagName === "SELECT") {
    const text = typeof value === "boolean" ? String(value) : value;
    if (![...el.options].some((o) => o.value === text && o.value !== "")) return false;
    el.value = text;
    return true;
  }
  if (value !== null && typeof value === "object" && !Array.isArray(value)) return false;
  el.value = Array.isArray(value) ? value.join(", ") : String(value);
  return true;
}
/** Fill the submit form with job ``jobId``'s request (GET /reproduce); what the form cannot show
 * travels with it unchanged (``form.dataset.carry``, read by readForm). */
async function prefillFromJob(form, jobId) {
  const r = await getJSON(`/v1/jobs/${encodeURIComponent(jobId)}/reproduce`);
  const body = { ...r.request };
  delete body.kind;
  if (r.kind === "export") body.source_job = r.source_job;
  const carry = {};
  const options = body.method_options || {};
  delete body.method_options;
  if (body.method !== undefined) {  // first: the method's own option fields appear when it changes
    if (setField(form, "method", body.method)) $("#f-method", form).dispatchEvent(new Event("change"));
    else carry.method = body.method;
    delete body.method;
  }
  for (const [k, v] of Object.entries(body)) if (!setField(form, k, v)) carry[k] = v;
  for (const [k, v] of Object.entries(options)) if (!setField(form, k, v)) (carry.method_options ||= {})[k] = v;
  form.dataset.carry = JSON.stringify(carry);
  const kept = Object.keys(carry);
  form.prepend(h("p", { id: "clone-note", class: "muted" }, "Filled in from job ", h("a", { class: "mono", href: `#/job/${jobId}` }, jobId.slice(0, 8)),
    ": every field of its spec; change what you want and submit. Name, tags and notes are not copied.",
    kept.length ? ` Sent as they were (the form has no field for them): ${kept.join(", ")}.` : ""));
}
