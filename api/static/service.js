/* The service itself and your keys (issue 18, items 5 and 6): the status page (#/status: queues,
 * workers, running attempts, recent failures; GET /v1/status) and the keys page (#/keys: your
 * API keys, create and revoke; GET/POST/DELETE /v1/keys).
 *
 * Loaded before app.js: it only declares functions, which use app.js's helpers (h, fill, $,
 * getJSON, api, later, toast, fmtTime, signOut, ...) when the router calls them. Every
 * user-written string (job names, key labels, error messages) goes into text nodes, never markup. */
"use strict";

// -- status ----------------------------------------------------------------------------------------
/** "3 s ago", "4 min ago", "2 h ago". */
function fmtAge(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  const s = Math.max(0, Math.round(seconds));
  return s < 120 ? `${s} s ago` : s < 7200 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}
const jobLink = (id) => h("a", { class: "mono", href: `#/job/${encodeURIComponent(id)}` }, id.slice(0, 8));
function table(id, headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted", id: id + "-empty" }, empty);
  return h("table", { id }, h("thead", {}, h("tr", {}, ...headers.map((c) => h("th", {}, c)))), h("tbody", {}, ...rows));
}
function workerJobs(w) {
  if (!w.jobs.length) return w.state === "up" ? h("span", { class: "muted" }, "idle") : "";
  return w.jobs.map((j) => (j.yours ? h("span", { class: "wjob" }, jobLink(j.id), ` ${j.kind}`, j.name ? ` · ${j.name}` : "")
    : h("span", { class: "muted wjob" }, "another owner's job")));
}
function statusView(s) {
  const queueRows = s.queues.map((q) => h("tr", { dataset: { queue: q.name } }, h("td", { class: "mono" }, q.name),
    h("td", { class: "num queued" }, q.queued), h("td", { class: "num" }, q.queued_yours), h("td", { class: "num" }, q.running),
    h("td", { class: "num" }, q.broker_messages ?? "?")));
  const states = Object.keys(s.jobs.all);
  const workerRows = s.workers.map((w) => h("tr", { dataset: { worker: w.name, state: w.state } },
    h("td", { class: "mono" }, w.name), h("td", {}, w.host), h("td", {}, w.device || ""), h("td", {}, w.queues.join(", ")),
    h("td", {}, h("span", { class: "wstate " + w.state }, w.state)), h("td", { class: "wjobs" }, workerJobs(w)),
    h("td", { title: fmtTime(w.heartbeat_at) }, fmtAge(w.heartbeat_age_s)), h("td", {}, fmtTime(w.started_at))));
  const runningRows = s.running.map((r) => h("tr", { dataset: { jobId: r.job_id } }, h("td", {}, jobLink(r.job_id)), h("td", {}, r.kind),
    h("td", { class: "name" }, r.name || ""), h("td", { class: "num" }, r.attempt), h("td", { class: "mono" }, r.worker),
    h("td", {}, fmtTime(r.started_at)), h("td", {}, progressCell({ status: "running", progress: r.progress, id: r.job_id }))));
  const failureRows = s.failures.map((f) => h("tr", { dataset: { jobId: f.job_id } }, h("td", {}, jobLink(f.job_id)), h("td", {}, f.kind),
    h("td", { class: "name" }, f.name || ""), h("td", { class: "num" }, f.attempt), h("td", {}, h("span", { class: "status failed" }, f.outcome)),
    h("td", {}, f.job_status), h("td", {}, fmtTime(f.ended_at)),
    h("td", { class: "err" }, f.error ? `${f.error.code || ""}: ${f.error.message || ""}` : "")));
  const others = (n, what) => (n ? h("p", { class: "muted" }, `${n} ${what} of other owners (not listed).`) : null);
  return [
    h("h2", {}, "Queues"),
    table("queues-table", ["queue", "queued", "yours", "running", "broker messages"], queueRows, "No queue."),
    h("h2", {}, "Jobs by state"),
    h("table", { id: "states-table" }, h("thead", {}, h("tr", {}, h("th", {}, ""), ...states.map((st) => h("th", {}, st)))),
      h("tbody", {}, h("tr", {}, h("td", {}, "all owners"), ...states.map((st) => h("td", { class: "num" }, s.jobs.all[st]))),
        h("tr", {}, h("td", {}, "yours"), ...states.map((st) => h("td", { class: "num" }, s.jobs.yours[st]))))),
    h("h2", {}, "Workers"),
    table("workers-table", ["worker", "host", "device", "queues", "state", "running", "last heartbeat", "started"], workerRows,
      "No worker has reported in the last 24 hours: start one (ssql up, or the worker service of docker-compose)."),
    h("h2", {}, "Your running attempts"),
    table("running-table", ["job", "kind", "name", "attempt", "worker", "started", "progress"], runningRows, "None of your jobs is running."),
    others(s.running_others, s.running_others === 1 ? "running attempt" : "running attempts"),
    h("h2", {}, `Your recent failures (last ${s.failures_window_hours} h)`),
    table("failures-table", ["job", "kind", "name", "attempt", "outcome", "job now", "ended", "error"], failureRows,
      "No attempt of yours failed in this window."),
    others(s.failures_others, s.failures_others === 1 ? "failed attempt" : "failed attempts"),
  ];
}
async function renderStatus() {
  const body = h("div", { id: "status-body" });
  const stamp = h("p", { class: "muted", id: "status-time" });
  fill(main, h("h1", {}, "Service status"), stamp, body,
    h("p", { class: "muted" }, "For Prometheus: ", h("code", {}, "GET /metrics"), " (request rates and latencies per route, jobs by state, ",
      "queue depth, attempt outcomes, worker heartbeats); a Grafana dashboard is in docs/grafana/ of the repository."));
  const load = async () => {
    const s = await getJSON("/v1/status");
    fill(body, statusView(s));
    stamp.textContent = `As of ${fmtTime(s.time)}; refreshed every 5 s.`;
  };
  await load();
  later(() => load().catch((e) => { if (e.name !== "AbortError") stamp.textContent = `Refresh failed: ${e.message}`; }), 5000);
}

// -- keys ------------------------------------------------------------------------------------------
async function renderKeys() {
  const list = h("div", { id: "keys-list" });
  const created = h("div", { id: "key-created" });
  const err = h("p", { class: "error", id: "key-error", role: "alert" });
  const form = h("form", { id: "key-form", class: "filters", autocomplete: "off", onsubmit: async (e) => {
    e.preventDefault();
    err.textContent = "";
    const label = $("#key-label").value.trim() || null;
    try {
      const k = await getJSON("/v1/keys", { method: "POST", json: { label } });
      $("#key-label").value = "";
      const secret = h("input", { id: "key-secret", class: "mono", readonly: true, value: k.key, size: 52 });
      fill(created, h("div", { class: "card notice" },
        h("p", {}, h("b", {}, "Copy this key now: it is shown only once. "), "Use it as ", h("code", {}, "Authorization: Bearer <key>"),
          ", SSQL_API_KEY, or sign in with it in another browser."),
        h("div", { class: "actions" }, secret, h("button", { type: "button", class: "secondary", id: "key-copy", onclick: async () => {
          secret.select();
          try { await navigator.clipboard.writeText(k.key); toast("copied"); } catch { toast("select the key and copy it"); }
        } }, "Copy"), h("button", { type: "button", class: "secondary", id: "key-dismiss", onclick: () => fill(created) }, "Done"))));
      secret.select();
      await load();
    } catch (e2) { if (!(e2 instanceof ApiError) || e2.status !== 401) err.textContent = e2.message; }
  } },
  h("input", { id: "key-label", placeholder: "label, e.g. laptop or CI", maxlength: 100, size: 30 }),
  h("button", { type: "submit", id: "key-create" }, "Create key"));
  const revokeButton = (k) => {
    let armed = null;
    const b = h("button", { type: "button", class: "danger", dataset: { keyId: String(k.id) }, onclick: async () => {
      if (!armed) {  // two clicks: a revoked key cannot be brought back
        b.textContent = k.current ? "Revoke and sign out" : "Confirm revoke";
        armed = setTimeout(() => { armed = null; b.textContent = "Revoke"; }, 5000);
        return;
      }
      clearTimeout(armed);
      b.disabled = true;
      try {
        await api(`/v1/keys/${k.id}`, { method: "DELETE" });
        if (k.current) { signOut("You revoked the key this browser used: sign in with another one."); return; }
        toast(`key ${k.prefix}… revoked`);
        await load();
      } catch (e) { b.disabled = false; if (!(e instanceof ApiError) || e.status !== 401) err.textContent = e.message; }
    } }, "Revoke");
    return b;
  };
  const load = async () => {
    const { items } = await getJSON("/v1/keys");
    const rows = items.map((k) => h("tr", { dataset: { keyId: String(k.id), state: k.revoked_at ? "revoked" : "active" } },
      h("td", { class: "mono" }, `${k.prefix}…`), h("td", { class: "name" }, k.label || ""), h("td", {}, fmtTime(k.created_at)),
      h("td", {}, k.revoked_at ? h("span", { class: "muted" }, `revoked ${fmtTime(k.revoked_at)}`) : h("span", { class: "status succeeded" }, "active")),
      h("td", {}, k.current ? h("b", {}, "this browser") : ""), h("td", {}, k.revoked_at ? "" : revokeButton(k))));
    fill(list, table("keys-table", ["key", "label", "created", "state", "", ""], rows, "No keys."));
  };
  fill(main, h("h1", {}, "API keys"),
    h("p", { class: "muted" }, "Your keys for the API, the CLI (SSQL_API_KEY) and this dashboard. A revoked key is refused at once. ",
      "This browser keeps the key you signed in with (every tab) until you sign out."),
    form, err, created, list);
  await load();
}
