/* Your datasets (issue 16): the list (#/datasets: GET /v1/datasets, refreshed while one validates),
 * uploading an archive or a folder's archive (POST /v1/datasets, the file as the body), registering
 * data already in a bucket ({"name", "uri"}), deleting one, and the submit form's dataset choice
 * offering your ready datasets as "upload:<id>".
 *
 * Loaded before app.js: it only declares functions, which use app.js's helpers (h, $, api, getJSON,
 * apiKey, ApiError, view, later, toast, fmtTime, fmtBytes) when called. Names, errors and URIs a user wrote go
 * into text nodes, never markup. */
"use strict";

/** The Content-Type of an archive, by its file name (the server reads the format from it). */
function archiveType(name) {
  const n = name.toLowerCase();
  if (n.endsWith(".zip")) return "application/zip";
  if (n.endsWith(".tar.gz") || n.endsWith(".tgz")) return "application/gzip";
  if (n.endsWith(".tar")) return "application/x-tar";
  return "application/octet-stream";
}
function datasetSummary(d) {
  if (d.status !== "ready") return "";
  return `${d.classes.length} classes, ${d.train_images} train / ${d.val_images} val`;
}
function datasetRow(d) {
  const del = h("button", { type: "button", class: "secondary small", dataset: { delete: d.id } }, "delete");
  del.addEventListener("click", async () => {
    if (!confirm(`Delete dataset ${d.name} (${d.id.slice(0, 8)})?`)) return;
    try { await api(`/v1/datasets/${encodeURIComponent(d.id)}`, { method: "DELETE" }); toast(`deleted ${d.name}`); await renderDatasets(); }
    catch (e) { toast(e.message); }
  });
  return h("tr", { dataset: { datasetId: d.id, status: d.status } },
    h("td", { class: "name", title: d.name }, d.name),
    h("td", { class: "mono" }, d.dataset),
    h("td", {}, h("span", { class: "status " + (d.status === "ready" ? "succeeded" : d.status === "invalid" ? "failed" : "running") }, d.status)),
    h("td", {}, datasetSummary(d)), h("td", { class: "num" }, d.bytes ? fmtBytes(d.bytes) : ""),
    h("td", { class: "mono", title: d.sha256 || "" }, d.sha256 ? d.sha256.slice(0, 12) : ""),
    h("td", { class: "uri" }, d.uri || "upload"), h("td", {}, fmtTime(d.created_at)),
    h("td", { class: "error ds-error" }, d.error || ""),
    h("td", { class: "actions" }, d.status === "ready" ? h("a", { class: "button small", href: `#/submit?kind=pretrain&dataset=${encodeURIComponent(d.dataset)}` }, "train on it") : null, del));
}
async function renderDatasets() {
  const page = await getJSON("/v1/datasets?limit=200");
  const err = h("p", { class: "error", id: "dataset-form-error", role: "alert" });
  const name = h("input", { id: "dataset-name", name: "name", placeholder: "name", required: true, maxlength: 200 });
  const file = h("input", { id: "dataset-file", type: "file", accept: ".zip,.tar,.tar.gz,.tgz" });
  const uri = h("input", { id: "dataset-uri", name: "uri", placeholder: "s3://bucket/prefix/ (data already in a bucket the server reads)", size: 48 });
  const progress = h("span", { class: "muted", id: "dataset-progress" });
  const form = h("form", { class: "card dsform", id: "dataset-form", novalidate: true },
    h("p", {}, "An archive (zip, tar, tar.gz) of ", h("code", {}, "train/<class>/*"), " and ", h("code", {}, "val/<class>/*"),
      " images (png, jpg, webp, bmp), or the ", h("code", {}, "s3://"), " URI of such a folder or archive. It is validated in the background; a ready one trains as ",
      h("code", {}, "upload:<id>"), "."),
    name, file, h("span", { class: "muted" }, " or "), uri, h("button", { type: "submit", id: "dataset-submit" }, "Add dataset"), progress, err);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    err.textContent = "";
    const btn = $("#dataset-submit", form); btn.disabled = true;
    try {
      let r;
      if (uri.value.trim()) r = await getJSON("/v1/datasets", { method: "POST", json: { name: name.value.trim(), uri: uri.value.trim() } });
      else if (file.files.length) {
        const f = file.files[0];
        progress.textContent = `sending ${fmtBytes(f.size)}…`;
        const sent = await fetch(`/v1/datasets?name=${encodeURIComponent(name.value.trim())}`, { method: "POST", body: f, signal: view.abort.signal,
          headers: { "Content-Type": archiveType(f.name), Authorization: "Bearer " + apiKey() } });  // the file streams as the body
        const body = await sent.json().catch(() => ({ detail: sent.statusText }));
        if (!sent.ok) throw new ApiError(sent.status, body);
        r = body;
      } else { err.textContent = "choose an archive, or give an s3:// URI"; return; }
      toast(`${r.name}: ${r.status}`);
      await renderDatasets();
    } catch (e2) {
      const d = e2.body && e2.body.detail;
      err.textContent = Array.isArray(d) ? d.map((x) => `${(x.loc || []).slice(1).join(".") || "body"}: ${x.msg}`).join("; ") : e2.message;
    } finally { btn.disabled = false; progress.textContent = ""; }
  });
  const rows = page.items.map(datasetRow);
  const list = rows.length
    ? h("table", { id: "datasets-table" }, h("thead", {}, h("tr", {}, ...["name", "dataset", "status", "contents", "size", "sha256", "from", "added", "error", ""].map((c) => h("th", {}, c)))), h("tbody", {}, ...rows))
    : h("p", { class: "muted", id: "datasets-empty" }, "No datasets yet.");
  main.replaceChildren(h("h1", {}, "Datasets"), form, list);
  if (page.items.some((d) => d.status === "validating")) {  // refresh until every validation ended
    const timer = later(async () => {
      const now = await getJSON("/v1/datasets?limit=200");
      if (!now.items.some((d) => d.status === "validating")) { clearInterval(timer); if ($("#datasets-table")) await renderDatasets(); }
    }, 1000);
  }
}
/** The submit form's dataset choice: your ready datasets after the server's own, by name
 * (value ``upload:<id>``); ``?dataset=upload:<id>`` selects one. */
async function addUploadedDatasets(form, params) {
  const select = $("#f-dataset", form);
  if (!select || select.tagName !== "SELECT") return;
  const page = await getJSON("/v1/datasets?status=ready&limit=200");
  if (page.items.length) {
    select.append(h("optgroup", { label: "your datasets", id: "uploaded-datasets" },
      ...page.items.map((d) => h("option", { value: d.dataset }, `${d.name} · ${datasetSummary(d)} (${d.dataset})`))));
  }
  const want = params.get("dataset");
  if (want && [...select.options].some((o) => o.value === want)) select.value = want;
}
