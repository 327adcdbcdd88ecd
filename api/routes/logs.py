"""``GET /v1/jobs/{id}/logs``: what the job's training processes wrote (stdout and stderr).

The supervisor keeps one file per attempt, ``<artifacts>/jobs/<id>/attempt-<n>.log`` (the runner's
stdout and stderr). The answer is plain text; each attempt's lines follow a label line
``==> attempt N <==`` (like ``tail`` with several files). ``tail=N`` keeps the last N lines over
all attempts; ``follow=true`` sends those, then new lines as they are written, until the job ends.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

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


def attempt_logs(settings: Settings, job_id: str) -> list[tuple[int, Path]]:
    """The job's attempt logs, oldest attempt first."""
    folder = settings.resolved_artifacts_dir() / "jobs" / job_id
    try:
        names = [(int(m.group(1)), folder / p.name) for p in folder.iterdir() if (m := _ATTEMPT_LOG.match(p.name))]
    except OSError:
        return []
    return sorted(names)


def _read_end(path: Path, limit: int = MAX_LOG_BYTES) -> tuple[list[str], int]:
    """The file's complete lines (at most the last ``limit`` bytes) and the offset after them."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            start = max(0, size - limit)
            f.seek(start)
            data = f.read()
    except OSError:
        return [], 0
    end = data.rfind(b"\n") + 1  # a partial last line is sent once it is complete
    lines = data[:end].decode(errors="replace").splitlines()
    if start > 0:
        lines = [f"[... {start} earlier bytes not shown ...]", *lines[1:]]
    return lines, start + end


def snapshot(settings: Settings, job_id: str, tail: int | None) -> tuple[list[str], dict[int, int]]:
    """Labelled lines of every attempt (the last ``tail`` log lines in all) and each file's read offset."""
    entries: list[tuple[int, str]] = []
    offsets: dict[int, int] = {}
    for attempt, path in attempt_logs(settings, job_id):
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
    lines, offsets = await anyio.to_thread.run_sync(snapshot, settings, job_id, tail)
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
            chunk = await anyio.to_thread.run_sync(_new_lines, settings, job_id, offsets)
            for attempt, text in chunk:
                if attempt != last_label:
                    yield label(attempt) + "\n"
                    last_label = attempt
                yield text
            if done:
                return
            await anyio.sleep(FOLLOW_POLL_S)

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8", headers=headers)


def _new_lines(settings: Settings, job_id: str, offsets: dict[int, int]) -> list[tuple[int, str]]:
    """Complete lines written since ``offsets`` (updated in place), per attempt."""
    out: list[tuple[int, str]] = []
    for attempt, path in attempt_logs(settings, job_id):
        start = offsets.get(attempt, 0)
        try:
            with path.open("rb") as f:
                f.seek(start)
                data = f.read(MAX_LOG_BYTES)
        except OSError:
            continue
        end = data.rfind(b"\n") + 1
        if end:
            offsets[attempt] = start + end
            out.append((attempt, data[:end].decode(errors="replace")))
    return out
