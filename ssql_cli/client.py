"""A small synchronous client of API v1 (used by the CLI commands and the demo)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """A non-success answer, with the server's explanation made readable."""

    def __init__(self, status: int, detail: Any) -> None:
        self.status, self.detail = status, detail
        if isinstance(detail, list):
            text = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:]) or 'body'}: {d.get('msg')}" for d in detail)
        else:
            text = str(detail)
        super().__init__(f"HTTP {status}: {text}")


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)
        return r

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post("/v1/jobs", json=body, headers=headers)).json()

    def export(self, job_id: str, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue an export job for a succeeded pretrain/eval job; its files appear under ``job_id``."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self.http.post(f"/v1/jobs/{job_id}/exports", json=body, headers=headers)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, status: str | None = None, kind: str | None = None, limit: int = 50, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        if kind:
            params["kind"] = kind
        return self._check(self.http.get("/v1/jobs", params=params)).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/jobs/{job_id}/cancel")).json()

    def results(self, job_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/results")).json()

    def metrics(self, job_id: str, after: int = 0) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/metrics", params={"after": after})).json()

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return self._check(self.http.get(f"/v1/jobs/{job_id}/checkpoints")).json()

    def catalog(self) -> dict[str, Any]:
        return self._check(self.http.get("/v1/catalog")).json()

    def download(self, job_id: str, bits: str, dest: Path, fmt: str | None = None) -> tuple[Path, str]:
        """Stream a checkpoint to ``dest`` and verify it against the ETag (sha256); returns (path, sha256)."""
        params = {"format": fmt} if fmt else {}
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        with self.http.stream("GET", f"/v1/jobs/{job_id}/checkpoints/{bits}", params=params) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            expected = r.headers.get("etag", "").strip('"')
            with tmp.open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
        if h.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise ApiError(0, f"downloaded bytes have sha256 {h.hexdigest()}, the server announced {expected}")
        tmp.replace(dest)
        return dest, expected

    def wait(
        self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None, poll_s: float = 0.5, timeout: float | None = None
    ) -> dict[str, Any]:
        """Poll until the job is terminal, calling ``on_update`` with each status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll_s)
