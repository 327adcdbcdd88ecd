"""``GET /v1/jobs/{id}/logs``: what the job's training processes wrote (stdout and stderr).

The supervisor keeps one file per attempt, ``<artifacts>/jobs/<id>/attempt-<n>.log`` (the runner's
stdout and stderr). The answer is plain text; each attempt's lines follow a label line
``==> attempt N <==`` (like ``tail`` with several files). ``tail=N`` keeps the last N lines over
all attempts; ``follow=true`` sends those, then new lines as they are written, until the job ends.

With ``SSQL_STORAGE_URL`` set, workers copy each attempt's log to the store as it grows
(worker/log_mirror.py); an attempt whose log this host lacks (it ran elsewhere) is read from
there, so the API needs no folder in common with the workers (a running attempt's lines arrive
every ``SSQL_LOG_MIRROR_SECONDS``).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from api.deps import UNAUTHORIZED_RESPONSE, JobId, Owner, StateDep
from api.head import is_head
from persistence.models import TERMINAL_STATUSES
from persistence.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=UNAUTHORIZED_RESPONSE)

FOLLOW_POLL_S = 0.5
#: the most bytes read from the end of one attempt's log (older output is left out, and said so)
MAX_LOG_BYTES = 4 << 20
MAX_TAIL = 100_000
_ATTEMPT_LOG = re.compile(r"^attempt-(\d+)\.log$")


def label(attempt: int) -> str:
    return f"==> attempt {attempt} <=="


class AttemptLog:
    """One attempt's log: a file of this host, or its copy in the object store."""

    def __init__(self, path: Path | None = None, store: Any = None, key: str | None = None) -> None:
        self.path, self.store, self.key = path, store, key

    def size(self) -> int:
        if self.path is not None:
            return self.path.stat().st_size
        return self.store.size(self.key)

    def read(self, start: int, length: int) -> bytes:
        if self.path is not None:
            with self.path.open("rb") as f:
                f.seek(start)
                return f.read(length)
        return self.store.read_range(self.key, start, length)


def attempt_logs(settings: Settings, job_id: str, stored: list[int] | None = None) -> list[tuple[int, AttemptLog]]:
    """The job's attempt logs, oldest attempt first: this host's files, and (``stored``: the job's
    attempt numbers, with a store) the copies in the store of the attempts this host lacks."""
    folder = settings.resolved_artifacts_dir() / "jobs" / job_id
    try:
        logs = {int(m.group(1)): AttemptLog(folder / p.name) for p in folder.iterdir() if (m := _ATTEMPT_LOG.match(p.name))}
    except OSError:
        logs = {}
    if stored:
        from storage import store_for
        from storage.keys import log_key

        store = store_for(settings)
        for attempt in stored:
            if attempt not in logs:
                log = AttemptLog(store=store, key=log_key(job_id, attempt))
                try:
                    log.size()
                except Exception:  # noqa: BLE001 - not copied yet, or the store is away
                    continue
                logs[attempt] = log
    return sorted(logs.items())


def _read_end(log: AttemptLog, limit: int = MAX_LOG_BYTES) -> tuple[list[str], int]:
    """The log's complete lines (at most the last ``limit`` bytes) and the offset after them."""
    try:
        size = log.size()
        start = max(0, size - limit)
        data = log.read(start, size - start)
    except Exception:  # noqa: BLE001 - a file gone, a store away: nothing to show of this attempt now
        return [], 0
    end = data.rfind(b"\n") + 1  # a partial last line is sent once it is complete
    lines = data[:end].decode(errors="replace").splitlines()
    if start > 0:
        lines = [f"[... {start} earlier bytes not shown ...]", *lines[1:]]
    return lines, start + end


def snapshot(settings: Settings, job_id: str, tail: int | None, stored: list[int] | None = None) -> tuple[list[str], dict[int, int]]:
    """Labelled lines of every attempt (the last ``tail`` log lines in all) and each file's read offset."""
    entries: list[tuple[int, str]] = []
    offsets: dict[int, int] = {}
    for attempt, path in attempt_logs(settings, job_id, stored):
        lines, offsets[attempt] = _read_end(path)
        entries += [(attempt, line) for line in lines]
    if tail is None:  # every attempt, an empty log too, under its label
        per: dict[int, list[str]] = {a: [] for a in offsets}
        for attempt, line in entries:
            per[attempt].append(line)
        return [x for attempt, lines in per.items() for x in (label(attempt), *lines)], offsets
    entries = entries[-tail:] if tail else []
    out: list[str] = []
    shown = None
    for attempt, line in entries:
        if attempt != shown:
            out.append(label(attempt))
            shown = attempt
        out.append(line)
    return out, offsets


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    response_model=None,
    responses={200: {"description": "text/plain: `==> attempt N <==` then that attempt's lines, for each attempt",
                     "content": {"text/plain": {}}},
               404: {"description": "job not found"}},
)  # fmt: skip
async def job_logs(
    job_id: JobId,
    owner: Owner,
    state: StateDep,
    request: Request,
    tail: Annotated[int | None, Query(ge=0, le=MAX_TAIL, description="only the last N lines (over all attempts)")] = None,
    follow: Annotated[bool, Query(description="keep the response open: new lines as they are written, until the job ends")] = False,
) -> PlainTextResponse | StreamingResponse:
    """The job's log: every attempt's stdout and stderr, each attempt labelled."""
    row = await state.reads.get_job(owner, job_id)
    if row is None:
        raise HTTPException(404, "job not found")
    settings = state.settings
    stored = await _attempts(state, job_id)
    lines, offsets = await anyio.to_thread.run_sync(snapshot, settings, job_id, tail, stored)
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if not follow or is_head(request):  # HEAD: the headers of the answer, not a stream left open
        return PlainTextResponse("".join(f"{line}\n" for line in lines), headers=headers)
    last_label = next((int(x.split()[2]) for x in reversed(lines) if x.startswith("==> attempt ")), None)

    async def stream() -> AsyncIterator[str]:
        nonlocal last_label
        if lines:
            yield "".join(f"{line}\n" for line in lines)
        done = False
        while not await request.is_disconnected():
            # read once more after the job ended: the lines written just before its end
            job = await state.reads.get_job(owner, job_id)
            done = job is None or job["status"] in TERMINAL_STATUSES
            chunk = await anyio.to_thread.run_sync(_new_lines, settings, job_id, offsets, await _attempts(state, job_id))
            for attempt, text in chunk:
                if attempt != last_label:
                    yield label(attempt) + "\n"
                    last_label = attempt
                yield text
            if done:
                return
            await anyio.sleep(FOLLOW_POLL_S)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8", headers=headers)


async def _attempts(state: Any, job_id: str) -> list[int] | None:
    """The job's attempt numbers, when logs may be in the store (``SSQL_STORAGE_URL`` set)."""
    if state.settings.storage_url is None:
        return None
    from sqlalchemy import select

    from persistence.models import JobAttempt

    async with state.engine.connect() as conn:
        return list((await conn.execute(select(JobAttempt.attempt).where(JobAttempt.job_id == job_id))).scalars())


def _new_lines(settings: Settings, job_id: str, offsets: dict[int, int], stored: list[int] | None = None) -> list[tuple[int, str]]:
    """Complete lines written since ``offsets`` (updated in place), per attempt."""
    out: list[tuple[int, str]] = []
    for attempt, log in attempt_logs(settings, job_id, stored):
        start = offsets.get(attempt, 0)
        try:
            data = log.read(start, MAX_LOG_BYTES)
        except Exception:  # noqa: BLE001 - gone, or the store is away: try again at the next poll
            continue
        end = data.rfind(b"\n") + 1
        if end:
            offsets[attempt] = start + end
            out.append((attempt, data[:end].decode(errors="replace")))
    return out
