"""Load test of the service API against Postgres, next to a bare FastAPI + asyncpg ceiling.

    .venv/bin/python bench/api_load.py [--clients 32] [--polls 24000] [--rounds 8] [--submissions 2000]

Starts, on 127.0.0.1 only: the real API (one uvicorn process, Postgres via asyncpg, Redis broker,
API-key auth) on a fresh database seeded with jobs, and a bare FastAPI app doing one indexed
SELECT per request through an asyncpg pool (the ceiling). A raw HTTP/1.1 keep-alive client with
N concurrent connections then measures, for each: status polls/s (GET /v1/jobs/{id}) and, for the
API, submissions/s (POST /v1/jobs, validated, committed and published), with p50/p99 latency.
The request count is bounded; nothing runs a training job (no worker is started).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG = {"host": "127.0.0.1", "port": 5432, "admin_db": "test"}
REDIS = "redis://127.0.0.1:6379/9"
HOST = "127.0.0.1"


# ---------------------------------------------------------------- the bare ceiling app
def bare_app(dsn: str):  # type: ignore[no-untyped-def]
    """FastAPI + asyncpg pool, one indexed SELECT by primary key, no auth: the ceiling."""
    import asyncpg
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state: dict = {}

    @app.on_event("startup")
    async def _start() -> None:
        state["pool"] = await asyncpg.create_pool(dsn, min_size=10, max_size=20)

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        async with state["pool"].acquire() as conn:
            row = await conn.fetchrow("SELECT id, kind, status, attempts, progress FROM jobs WHERE id = $1", job_id)
        if row is None:
            raise HTTPException(404)
        return JSONResponse({"id": row["id"], "kind": row["kind"], "status": row["status"],
                             "attempts": row["attempts"], "progress": json.loads(row["progress"] or "null")})  # fmt: skip

    return app


# ---------------------------------------------------------------- load client
async def _one_connection(port: int, requests: list[bytes], latencies: list[float], statuses: dict[int, int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for req in requests:
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _load(port: int, make_request, total: int, clients: int) -> dict:  # type: ignore[no-untyped-def]
    per = [[make_request() for _ in range(total // clients)] for _ in range(clients)]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    t0 = time.perf_counter()
    await asyncio.gather(*(_one_connection(port, reqs, latencies, statuses) for reqs in per))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
        "statuses": statuses,
    }


def run_load(port: int, make_request, total: int, clients: int, warmup: int) -> dict:  # type: ignore[no-untyped-def]
    if warmup:
        asyncio.run(_load(port, make_request, warmup, clients))
    return asyncio.run(_load(port, make_request, total, clients))


def _median_run(runs: list[dict]) -> dict:
    """Per-figure medians over rounds; request and status counts are summed."""
    statuses: dict[int, int] = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "statuses": statuses,
    }


def get_request(path: str, key: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n{auth}\r\n".encode()


def post_request(path: str, body: dict, key: str) -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
    return head.encode() + data


# ---------------------------------------------------------------- setup
def _wait_http(port: int, path: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{HOST}:{port}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server on port {port} not up")


def _seed(settings, n_jobs: int) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    from sqlalchemy import insert

    from persistence.db import make_engine, make_sessionmaker, utcnow
    from persistence.keys import create_key
    from persistence.models import Job, User

    engine = make_engine(settings)
    Sessions = make_sessionmaker(engine)
    with Sessions() as s:
        key = create_key(s, "bench")
        create_key(s, "someone-else")
        owner = s.query(User).filter_by(name="bench").one().id
        other = s.query(User).filter_by(name="someone-else").one().id
        now = utcnow()
        ids = []
        rows = []
        for i in range(n_jobs):
            jid = str(uuid.uuid4())
            mine = i % 2 == 0
            if mine:
                ids.append(jid)
            rows.append({
                "id": jid, "owner_id": owner if mine else other, "kind": "pretrain", "status": "running",
                "spec": {"config": {"method": "ssql", "epochs": 10}}, "attempts": 1, "max_attempts": 3,
                "cancel_requested": False, "created_at": now, "updated_at": now,
                "progress": {"phase": "pretrain", "fraction": 0.5, "epoch": 5, "epochs": 10, "step": 50,
                             "total_steps": 100, "images_per_s": 1000.0, "eta_s": 30.0, "loss": -0.5, "lr": 0.01},
            })  # fmt: skip
        s.execute(insert(Job), rows)
        s.commit()
    engine.dispose()
    return key, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--polls", type=int, default=24000, help="status polls per server, over all rounds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--submissions", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=20000, help="rows seeded into the jobs table")
    ap.add_argument("--serve-bare", metavar="DSN", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve_bare:
        import uvicorn

        uvicorn.run(bare_app(args.serve_bare), host=HOST, port=args.port, log_level="warning")
        return 0

    import psycopg

    from persistence.migrate import upgrade_head
    from persistence.settings import Settings
    from ssql_cli.stack import api_command, free_port

    db = f"ssql_bench_{uuid.uuid4().hex[:8]}"
    user = "postgres"
    with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=user, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    url = f"postgresql://{user}@{PG['host']}:{PG['port']}/{db}"
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"ssql_bench_{db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
    env.update(SSQL_HOME=str(home), SSQL_DATABASE_URL=url, SSQL_BROKER_URL=REDIS, SSQL_QUEUE=queue)
    settings = Settings(home=home, database_url=url, broker_url=REDIS, queue=queue)
    procs: list[subprocess.Popen] = []
    try:
        upgrade_head(settings)
        key, ids = _seed(settings, args.jobs)
        api_port, bare_port = free_port(), free_port()
        procs.append(subprocess.Popen(api_command(HOST, api_port), env=env, cwd=ROOT))
        procs.append(subprocess.Popen([sys.executable, __file__, "--serve-bare", url.replace("postgresql://", "postgres://"),
                                       "--port", str(bare_port)], env=env, cwd=ROOT))  # fmt: skip
        _wait_http(api_port, "/healthz")
        _wait_http(bare_port, "/docs")
        rnd = random.Random(0)
        warm = max(args.clients * 20, 1000)
        n = args.clients

        # Poll runs alternate in short rounds (order flipped every round) so that background load
        # on a shared machine hits both alike; figures are medians over rounds, the ratio is the
        # median of the per-round ratios.
        bare_runs, api_runs = [], []
        per_round = max(args.polls // args.rounds, n * 50)
        bare_req = lambda: get_request(f"/jobs/{rnd.choice(ids)}")  # noqa: E731
        api_req = lambda: get_request(f"/v1/jobs/{rnd.choice(ids)}", key)  # noqa: E731
        run_load(bare_port, bare_req, warm, n, 0)
        run_load(api_port, api_req, warm, n, 0)
        for i in range(args.rounds):
            order = [(bare_port, bare_req, bare_runs), (api_port, api_req, api_runs)]
            for port, make, runs in order if i % 2 == 0 else order[::-1]:
                runs.append(run_load(port, make, per_round, n, 0))
        bare, polls = _median_run(bare_runs), _median_run(api_runs)
        ratio = statistics.median(a["rps"] / b["rps"] for a, b in zip(api_runs, bare_runs, strict=True))
        tiny = {"kind": "pretrain", "dataset": "synthetic", "epochs": 1, "width": 0.0625, "image_size": 16}
        subs = run_load(api_port, lambda: post_request("/v1/jobs", tiny, key), args.submissions, n, n * 2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=user, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        import redis

        queued_messages = redis.Redis.from_url(REDIS).llen(queue)
        redis.Redis.from_url(REDIS).delete(queue)

    def line(name: str, r: dict) -> str:
        return (f"{name:<34} {r['rps']:8.0f} req/s   p50 {r['p50_ms']:6.1f} ms   p99 {r['p99_ms']:6.1f} ms"
                f"   ({r['requests']} requests, statuses {r['statuses']})")  # fmt: skip

    print(f"{n} concurrent clients, {args.jobs} jobs in the table, 127.0.0.1, one uvicorn process each,"
          f" polls in {args.rounds} alternating rounds (medians)")  # fmt: skip
    print(line("bare FastAPI+asyncpg SELECT", bare))
    print(line("API GET /v1/jobs/{id} (auth)", polls))
    print(line("API POST /v1/jobs (auth)", subs))
    print(f"messages on the Redis queue afterwards: {queued_messages} (one per 201, warm-up included)")
    print(f"status polls / bare = {ratio:.2f} (median of per-round ratios; target >= 0.75 with p99 <= 30 ms)")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
