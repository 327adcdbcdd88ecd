"""A typed, synchronous client of the SSQL service's API v1 (used by the ``ssql`` CLI and notebooks).

>>> from ssql_client import Client
>>> c = Client()                                   # SSQL_URL / SSQL_API_KEY, or Client(url, key)
>>> job = c.pretrain(dataset="digits", epochs=2, width=0.125, image_size=16, max_samples=512)
>>> job = c.wait(job["id"], progress=True)         # a tqdm bar (renders in Jupyter too)
>>> ev = c.wait(c.evaluate(job["id"], ["fp", "4w4a", "2w4a"], epochs=5)["id"], progress=True)
>>> c.result_rows(ev["id"])                         # [{"bits": "fp", "top1": 71.2, ...}, ...]
>>> c.download(job["id"], "4w4a", "model.safetensors", fmt="safetensors")  # sha256 verified
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8000"
#: answers a proxy or a restarting server gives while the service itself may be fine
_RETRYABLE_STATUS = (502, 503, 504)


class Progress(TypedDict, total=False):
    phase: str | None
    fraction: float
    epoch: int | None
    epochs: int | None
    step: int | None
    total_steps: int | None
    images_per_s: float | None
    eta_s: float | None
    loss: float | None
    lr: float | None


class JobError(TypedDict, total=False):
    code: str
    message: str
    field: str | None


class Job(TypedDict, total=False):
    id: str
    kind: str
    status: str
    spec: dict[str, Any]
    progress: Progress | None
    attempts: int
    max_attempts: int
    error: JobError | None
    source_job: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    name: str | None
    tags: list[str]
    notes: str | None
    priority: int


class ResultRow(TypedDict, total=False):
    bits: str
    protocol: str
    top1: float | None
    calibration: str | None
    ptq: str | None
    calib_images: int | None
    epochs: int | None
    dataset: str | None


class Checkpoint(TypedDict, total=False):
    bits: str
    format: str
    bytes: int
    sha256: str
    url: str
    produced_by: str | None


class ApiError(Exception):
    """A non-success answer, with the server's explanation made readable (``status``, ``detail``)."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        if isinstance(detail, list):
            text = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'body'}: {d.get('msg')}" for d in detail)
        else:
            text = str(detail)
        super().__init__(f"HTTP {status}: {text}")


class ServerUnreachable(ApiError):
    """No answer at all from the server (refused, timed out, name unknown): ``url`` says where."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        Exception.__init__(self, f"cannot reach the SSQL server at {url} ({reason}); is it running (`ssql up`)? "
                           "set SSQL_URL or --url for another address")  # fmt: skip
        self.status, self.detail = 0, reason


class ChecksumMismatch(ApiError):
    """The downloaded bytes do not hash to the sha256 the server announced (the file is removed)."""


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out: {type(exc).__name__}"
    return text


class Client:
    """One server and one API key. Every method raises :class:`ApiError` for an error answer
    (``e.status``, ``e.detail``; a 422's ``detail`` names the field) and :class:`ServerUnreachable`
    when there is no answer."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("SSQL_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("SSQL_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._fields: tuple[dict[str, Any], set[str]] | None = None  # request_fields' OpenAPI schemas, method options

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"  # never the key

    # -- plumbing -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ServerUnreachable(self.url, _reason(e)) from None
        return self._check(r)

    @staticmethod
    def _check(r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail", r.text) if isinstance(body, dict) else body
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r

    # -- jobs -----------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        """Submit a job body (``{"kind": "pretrain", ...}``). A fresh Idempotency-Key is sent
        unless one is given, so a retried submission never creates a second job."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return self._request("POST", "/v1/jobs", json=body, headers=headers).json()

    def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        """A dry run (``POST /v1/jobs?dry_run=1``): the validated ``spec``, the cost ``estimate``
        (device_hours, peak_memory_gb, pflops, device_kind) and the ``quota`` refusal a submission
        would get now (None: accepted); nothing is queued."""
        return self._request("POST", "/v1/jobs", params={"dry_run": "1"}, json=body).json()

    def pretrain(self, **fields: Any) -> Job:
        """``pretrain(method="ssql", dataset="digits", epochs=20, ...)``: see ``GET /v1/catalog``."""
        return self.submit({"kind": "pretrain", **fields})

    def evaluate(self, source_job: str, bits: list[str] | str, **fields: Any) -> Job:
        """An eval job of a succeeded pretrain job at ``bits`` (a list or "fp,4w4a")."""
        bits = bits.split(",") if isinstance(bits, str) else list(bits)
        return self.submit({"kind": "eval", "source_job": source_job, "bits": bits, **fields})

    def distill(self, source_job: str, bits: str, quantizer: str = "psq", **fields: Any) -> Job:
        """SQAKD from a succeeded eval job (linear protocol with ``fp``) to ``bits``."""
        return self.submit({"kind": "distill", "source_job": source_job, "bits": bits, "quantizer": quantizer, **fields})

    def finetune(self, source_job: str, bits: str = "4w4a", quantizer: str = "psq", **fields: Any) -> Job:
        """Supervised quantization-aware fine-tuning of a succeeded pretrain job at one bit-width
        (``fp`` allowed); ``dataset=`` another dataset makes it a transfer. Result: ``result_rows``."""
        return self.submit({"kind": "finetune", "source_job": source_job, "bits": bits, "quantizer": quantizer, **fields})

    def export(self, job_id: str, body: dict[str, Any], idempotency_key: str | None = None) -> Job:
        """Queue an export job for a succeeded pretrain/eval job; its files appear under ``job_id``."""
        headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
        return self._request("POST", f"/v1/jobs/{job_id}/exports", json=body, headers=headers).json()

    def job(self, job_id: str) -> Job:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    status = job

    def jobs(self, status: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0, *,
             method: str | None = None, dataset: str | None = None, tags: list[str] | str | None = None,
             q: str | None = None, sort: str | None = None) -> dict[str, Any]:
        """A page of your jobs matching every filter given: ``{"items": [Job, ...], "next_offset": int | None}``.

        ``tags``: jobs with all of them; ``q``: text in the name or notes (or the id's start);
        ``sort``: ``created_at`` (default, newest first), ``name``, ``-updated_at``, ``top1:4w4a`` ..."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        for name, value in (("status", status), ("kind", kind), ("method", method), ("dataset", dataset), ("q", q), ("sort", sort)):
            if value:
                params[name] = value
        if tags:
            params["tag"] = [tags] if isinstance(tags, str) else list(tags)
        return self._request("GET", "/v1/jobs", params=params).json()

    def update(self, job_id: str, **labels: Any) -> Job:
        """Set a job's ``name``, ``tags``, ``notes`` or ``priority`` (only those given; ``None``
        clears, a priority back to 0): ``c.update(job_id, name="r18 baseline", tags=["paper"])``.
        ``priority`` (-100..100, higher first) orders your own queued jobs."""
        unknown = set(labels) - {"name", "tags", "notes", "priority"}
        if unknown:
            raise TypeError(f"update() takes name, tags, notes and priority, not {sorted(unknown)}")
        return self._request("PATCH", f"/v1/jobs/{job_id}", json=labels).json()

    def usage(self) -> dict[str, Any]:
        """Your quotas and usage (``GET /v1/usage``): ``limits`` (None: no limit), ``usage``
        (active_jobs, running_jobs, devices, device_hours), ``can_submit`` and ``refusal``."""
        return self._request("GET", "/v1/usage").json()

    def service_status(self, failures_hours: float = 24.0) -> dict[str, Any]:
        """The service itself (``GET /v1/status``): ``queues`` (depth per queue), ``workers`` (host,
        device, state, current jobs, last heartbeat), your ``running`` attempts and recent
        ``failures``; other owners' jobs only as counts (``running_others``, ``failures_others``)."""
        return self._request("GET", "/v1/status", params={"failures_hours": failures_hours}).json()

    def keys(self) -> list[dict[str, Any]]:
        """Your API keys, newest first (id, prefix, label, created_at, revoked_at, current); never secrets."""
        return self._request("GET", "/v1/keys").json()["items"]

    def create_key(self, label: str | None = None) -> dict[str, Any]:
        """A new key of yours; its secret (``["key"]``) is in this answer only."""
        return self._request("POST", "/v1/keys", json={"label": label}).json()

    def revoke_key(self, key_id: int) -> None:
        """Revoke one of your keys (refused by the API at once); revoking this client's own key ends its use."""
        self._request("DELETE", f"/v1/keys/{int(key_id)}")

    def cancel(self, job_id: str) -> Job:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def results(self, job_id: str) -> dict[str, Any]:
        """The raw answer of ``GET /v1/jobs/{id}/results`` (``{"job_id", "rows": [...]}``)."""
        return self._request("GET", f"/v1/jobs/{job_id}/results").json()

    def result_rows(self, job_id: str) -> list[ResultRow]:
        """An eval job's rows (one per bit-width) as plain dicts, e.g. for ``pandas.DataFrame``."""
        return list(self.results(job_id)["rows"])

    def metrics(self, job_id: str, after: int = 0, max_points: int | None = None) -> dict[str, Any]:
        """A page of the job's metric samples after ``after`` (``next_after`` continues); with
        ``max_points`` the whole history in at most that many samples, min/max-preserving."""
        params: dict[str, Any] = {"after": after, **({"max_points": max_points} if max_points is not None else {})}
        return self._request("GET", f"/v1/jobs/{job_id}/metrics", params=params).json()

    def metrics_csv(self, *job_ids: str) -> str:
        """Every metric sample of one or more jobs as CSV text (one header; ``job_id`` on every row)."""
        if len(job_ids) == 1:
            return self._request("GET", f"/v1/jobs/{job_ids[0]}/metrics", params={"format": "csv"}).text
        return self._request("GET", "/v1/compare/metrics.csv", params={"job": list(job_ids)}).text

    def results_csv(self, *job_ids: str) -> str:
        """The result rows of one or more jobs as CSV text, each with its job's name, method,
        calibration, probe and quantizer."""
        if len(job_ids) == 1:
            return self._request("GET", f"/v1/jobs/{job_ids[0]}/results", params={"format": "csv"}).text
        return self._request("GET", "/v1/compare/results.csv", params={"job": list(job_ids)}).text

    def lineage(self, job_id: str) -> dict[str, Any]:
        """The job's chain: ``parents`` (its source first), ``children`` and the whole ``tree``."""
        return self._request("GET", f"/v1/jobs/{job_id}/lineage").json()

    def reproduce(self, job_id: str) -> dict[str, Any]:
        """The request that makes the job again: ``request``, ``minimal``, ``path``, ``cli``."""
        return self._request("GET", f"/v1/jobs/{job_id}/reproduce").json()

    def request_fields(self, kind: str) -> tuple[set[str], dict[str, set[str]]]:
        """The field names a ``kind`` request takes (from the server's OpenAPI document and, for
        a pretrain, every method's options) and the names inside its object fields."""
        if self._fields is None:
            doc = self._request("GET", "/openapi.json").json()
            methods = self.catalog().get("methods") or {}
            self._fields = (doc["components"]["schemas"], {n for m in methods.values() for n in (m.get("options") or {})})
        schemas, options = self._fields
        model = {"pretrain": "PretrainRequest", "eval": "EvalRequest", "distill": "DistillRequest",
                 "finetune": "FinetuneRequest", "export": "ExportRequest"}[kind]
        names = set((schemas.get(model) or {}).get("properties") or {}) - {"kind"}
        if kind == "pretrain":
            return names | options, {"method_options": options}
        return names | {"source_job"}, {}

    def clone(self, job_id: str, changes: dict[str, Any] | None = None, idempotency_key: str | None = None,
              **labels: Any) -> Job:
        """Submit a job with ``job_id``'s spec, ``changes`` applied by dotted name
        (``{"epochs": 5, "method_options.lambda": 0.1}``; an unknown name raises
        :class:`~ssql_client.overrides.UnknownField`); ``labels``: name, tags, notes."""
        from ssql_client import overrides

        r = self.reproduce(job_id)
        known, nested = self.request_fields(r["kind"])
        body = overrides.apply(r["request"], changes or {}, r["kind"], known, nested)
        body.update(labels)
        if r["kind"] == "export":
            return self.export(body.pop("source_job", None) or r["source_job"], body, idempotency_key)
        return self.submit(body, idempotency_key)

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return self._request("GET", f"/v1/jobs/{job_id}/checkpoints").json()

    # -- datasets -------------------------------------------------------------------------------

    def upload_dataset(self, path: str | Path, name: str, wait: bool = True, timeout: float = 3600.0,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Upload an image folder (``train/<class>/*``, ``val/<class>/*``) or an archive of one
        (.zip, .tar, .tar.gz/.tgz); a folder is packed into a .tar.gz first. The body is streamed
        from disk; ``progress(sent, total)`` is called as it goes. With ``wait`` the call returns
        once the server has validated it (``status`` ``ready`` or ``invalid``); use
        ``dataset["dataset"]`` (``"upload:<id>"``) as a job's dataset."""
        import tempfile

        from storage.archives import pack_folder

        path = Path(path)
        with tempfile.TemporaryDirectory(prefix="ssql-upload-") as tmp:
            if path.is_dir():
                path = pack_folder(path, Path(tmp) / f"{path.name or 'dataset'}.tar.gz")
            ctype = archive_content_type(path)
            total = path.stat().st_size

            def chunks() -> Iterator[bytes]:
                sent = 0
                with path.open("rb") as f:
                    while block := f.read(1 << 20):
                        sent += len(block)
                        yield block
                        if progress is not None:
                            progress(sent, total)

            r = self._request("POST", "/v1/datasets", params={"name": name}, content=chunks(),
                              headers={"Content-Type": ctype, "Content-Length": str(total)}, timeout=None)
        dataset = r.json()
        return self.wait_dataset(dataset["id"], timeout) if wait else dataset

    def register_dataset(self, uri: str, name: str, wait: bool = True, timeout: float = 3600.0) -> dict[str, Any]:
        """Register data already in a bucket the server may read: ``s3://bucket/prefix/`` (an image
        folder) or ``s3://bucket/key.zip`` (``.tar``, ``.tar.gz``, ``.tgz``). The server copies and
        validates it like an upload; with ``wait`` the call returns once that is done."""
        dataset = self._request("POST", "/v1/datasets", json={"name": name, "uri": uri}).json()
        return self.wait_dataset(dataset["id"], timeout) if wait else dataset

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/datasets/{dataset_id}").json()

    def datasets(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """A page of your datasets: ``{"items": [...], "next_offset"}``."""
        params: dict[str, Any] = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return self._request("GET", "/v1/datasets", params=params).json()

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset and its stored archive (409 while a queued or running job uses it)."""
        self._request("DELETE", f"/v1/datasets/{dataset_id}")

    def wait_dataset(self, dataset_id: str, timeout: float = 3600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the dataset is no longer ``validating``."""
        deadline = time.monotonic() + timeout
        while True:
            d = self.dataset(dataset_id)
            if d["status"] != "validating" or time.monotonic() > deadline:
                return d
            time.sleep(poll)

    def catalog(self) -> dict[str, Any]:
        return self._request("GET", "/v1/catalog").json()

    def logs(self, job_id: str, tail: int | None = None) -> str:
        """The job's log: each attempt's stdout/stderr under a ``==> attempt N <==`` line."""
        params = {"tail": tail} if tail is not None else {}
        return self._request("GET", f"/v1/jobs/{job_id}/logs", params=params).text

    def follow_logs(self, job_id: str, tail: int | None = None) -> Iterator[str]:
        """The log's lines as they are written, until the job ends."""
        params: dict[str, Any] = {"follow": "true"}
        if tail is not None:
            params["tail"] = tail
        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/logs", params=params, timeout=httpx.Timeout(30, read=None)) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                yield from r.iter_lines()
        except httpx.TransportError as e:
            raise ServerUnreachable(self.url, _reason(e)) from None

    # -- files ----------------------------------------------------------------------------------

    def download(self, job_id: str, bits: str, dest: str | Path, fmt: str | None = None) -> tuple[Path, str]:
        """Stream a checkpoint to ``dest`` and verify it against the ETag (sha256); returns
        ``(path, sha256)``. A mismatch removes the partial file and raises :class:`ChecksumMismatch`."""
        dest = Path(dest)
        params = {"format": fmt} if fmt else {}
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        try:
            # a server may redirect to a presigned URL of its object store (SSQL_DOWNLOAD_REDIRECT): httpx
            # does not send the API key to another origin; the digest is the API's answer's
            with self.http.stream("GET", f"/v1/jobs/{job_id}/checkpoints/{bits}", params=params, follow_redirects=True) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                expected = (r.history[0] if r.history else r).headers.get("etag", "").strip('"')
                with tmp.open("wb") as f:
                    for chunk in r.iter_bytes(1 << 20):
                        h.update(chunk)
                        f.write(chunk)
        except httpx.TransportError as e:
            tmp.unlink(missing_ok=True)
            raise ServerUnreachable(self.url, _reason(e)) from None
        if h.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise ChecksumMismatch(0, f"downloaded bytes have sha256 {h.hexdigest()}, the server announced {expected}")
        tmp.replace(dest)
        return dest, expected

    # -- waiting --------------------------------------------------------------------------------

    def wait(
        self,
        job_id: str,
        on_update: Callable[[Job], None] | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
        reconnect_s: float = 300.0,
        on_retry: Callable[[Exception, int], None] | None = None,
        progress: bool = False,
    ) -> Job:
        """Poll until the job is terminal and return it, calling ``on_update`` with each status.

        A lost connection (or a 502/503/504) is retried with backoff for up to ``reconnect_s``
        seconds since the last answer (``on_retry(error, tries)`` is told of each retry); then
        :class:`ServerUnreachable` is raised. ``progress=True`` shows a tqdm bar (``tqdm.auto``:
        a widget in Jupyter, a text bar in a terminal)."""
        bar = _TqdmBar(job_id) if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        last_ok, tries = time.monotonic(), 0
        try:
            while True:
                try:
                    job = self.job(job_id)
                except (ServerUnreachable, ApiError) as e:
                    if not isinstance(e, ServerUnreachable) and e.status not in _RETRYABLE_STATUS:
                        raise
                    tries += 1
                    if time.monotonic() - last_ok > reconnect_s:
                        raise
                    if on_retry:
                        on_retry(e, tries)
                    time.sleep(min(5.0, poll_s * 2 ** min(tries, 4)))
                    continue
                last_ok, tries = time.monotonic(), 0
                if on_update:
                    on_update(job)
                if bar is not None:
                    bar.update(job)
                if job["status"] in TERMINAL:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
                time.sleep(poll_s)
        finally:
            if bar is not None:
                bar.close()


class _TqdmBar:
    """A job's progress as a tqdm bar in percent (tqdm.auto picks the notebook widget when it can)."""

    def __init__(self, job_id: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=100, desc=job_id[:8], unit="%", bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def update(self, job: Job) -> None:
        p = job.get("progress") or {}
        pct = round(100 * float(p.get("fraction") or 0.0), 1)
        self.bar.n = pct if job["status"] != "succeeded" else 100
        post = {"status": job["status"]}
        if p.get("loss") is not None:
            post["loss"] = f"{p['loss']:.4f}"
        if p.get("epoch") is not None and p.get("epochs"):
            post["epoch"] = f"{p['epoch']}/{p['epochs']}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


#: an archive's Content-Type by its file name
ARCHIVE_SUFFIXES = {".zip": "application/zip", ".tar": "application/x-tar", ".tar.gz": "application/gzip", ".tgz": "application/gzip"}


def archive_content_type(path: Path) -> str:
    name = path.name.lower()
    for suffix, ctype in ARCHIVE_SUFFIXES.items():
        if name.endswith(suffix):
            return ctype
    raise ValueError(f"{path}: not a folder nor a .zip, .tar, .tar.gz or .tgz archive; pass the image folder "
                     "itself (train/<class>/*, val/<class>/*) and it is packed for you")
