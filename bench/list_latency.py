"""The job list's latency over Postgres with 10,000 jobs of several owners, before and after the
indexes of migration 0012, in one run.

    nice .venv/bin/python bench/list_latency.py [--jobs 10000] [--requests 400] [--explain]

On a fresh database migrated to the revision before 0012 it seeds ``--jobs`` jobs across five
owners (the measured owner holds 40 % of them, ``--share``: pretrain, eval and finetune jobs, one to three tags
each, eval jobs with a linear-probe top-1 at eight bit-widths), starts the real API (one uvicorn
process, asyncpg), and times ``GET /v1/jobs`` one request at a time (the latency a dashboard user
waits for) for each query below, in rounds that alternate the schema before 0012 and with it (the
migration's own downgrade / upgrade, then ``ANALYZE``; the order flips every round, so background
load on a shared machine hits both alike), on the same API process. Prints p50 / p99 per query and
phase and the p99 ratio; ``--explain`` also prints Postgres's plans of the headline query (tag
filter + top-1 sort) and of the unfiltered top-1 sort in each phase. No worker runs: nothing is trained.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api_load import HOST, PG, REDIS, _wait_http, get_request  # noqa: E402  (this folder is on sys.path)

BITS = ["fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a"]
TAGS = ["paper", "ablation", "sweep", "baseline", "cifar", "imagenet", "r18", "r50", "lr-1e-3", "lr-3e-3",
        "bs256", "bs512", "seed0", "seed1", "seed2", "mse", "minmax", "bn", "long", "short"]
METHODS = ["ssql", "simsiam", "byol", "simclr", "mocov2"]
DATASETS = ["cifar10", "cifar100", "imagenet100", "stl10"]
#: the measured queries: (label, query string)
QUERIES = [
    ("tag + top1:4w4a sort (headline)", "tag=paper&sort=top1:4w4a"),
    ("tag, newest first", "tag=paper"),
    ("top1:4w4a sort, no filter", "sort=top1:4w4a"),
    ("two tags + top1:2w4a sort", "tag=paper&tag=r18&sort=top1:2w4a"),
    ("no filter, newest first", ""),
]


def seed(settings: Any, n_jobs: int, rnd: random.Random, share: float) -> str:
    """Insert the jobs (with tags and results) in bulk; returns the measured owner's API key."""
    from sqlalchemy import insert

    from persistence.db import make_engine, make_sessionmaker, utcnow
    from persistence.keys import hash_key, new_key
    from persistence.models import ApiKey, Job, JobResult, JobTag, User

    engine = make_engine(settings)
    with make_sessionmaker(engine)() as s:
        # Core inserts naming their columns: the schema is the one before the measured revision
        now, owners = utcnow(), {}
        weights = {"alice": share, **{name: (1 - share) / 4 for name in ("bob", "carol", "dave", "erin")}}
        for name in weights:
            owners[name] = s.execute(insert(User).values(name=name, created_at=now).returning(User.id)).scalar_one()
        key = new_key()
        s.execute(insert(ApiKey).values(user_id=owners["alice"], key_hash=hash_key(key), prefix=key[:12], created_at=now))
        jobs, tags, results = [], [], []
        for i in range(n_jobs):
            jid, owner = str(uuid.uuid4()), owners[rnd.choices(list(weights), list(weights.values()))[0]]
            kind = rnd.choices(["pretrain", "eval", "finetune"], [0.35, 0.55, 0.10])[0]
            status = rnd.choices(["succeeded", "failed", "cancelled", "queued", "running"], [0.8, 0.08, 0.04, 0.05, 0.03])[0]
            created = now - timedelta(minutes=n_jobs - i)
            job_tags = rnd.sample(TAGS, rnd.randint(1, 3)) + (["paper"] if rnd.random() < 0.3 else [])
            job_tags = list(dict.fromkeys(job_tags))
            config = {"method": rnd.choice(METHODS), "dataset": rnd.choice(DATASETS), "backbone": "resnet18",
                      "epochs": 200, "batch_size": 256, "lr": 0.05}
            if kind == "eval":
                config = {"checkpoint": "last.pt", "bits": BITS, "epochs": 100, "calibration": "mse"}
            jobs.append({
                "id": jid, "owner_id": owner, "kind": kind, "status": status, "spec": {"kind": kind, "config": config},
                "attempts": 1, "max_attempts": 3, "cancel_requested": False, "created_at": created, "updated_at": created,
                "started_at": created, "finished_at": created + timedelta(minutes=30) if status in ("succeeded", "failed") else None,
                "progress": {"phase": "done", "fraction": 1.0, "epoch": 200, "epochs": 200},
                "summary": {"images_per_s": 1000.0}, "name": f"run {i} {config.get('method', 'probe')}", "tags": job_tags,
            })  # fmt: skip
            tags += [{"job_id": jid, "tag": t, "owner_id": owner} for t in job_tags]
            if kind == "eval" and status == "succeeded":
                for b in BITS:
                    top1 = rnd.uniform(10, 90)
                    results.append({"job_id": jid, "bits": b, "protocol": "linear", "top1": top1,
                                    "row": {"bits": b, "protocol": "linear", "top1": top1}, "created_at": created})
        for table, rows in ((Job, jobs), (JobTag, tags), (JobResult, results)):
            for start in range(0, len(rows), 2000):
                s.execute(insert(table), rows[start:start + 2000])
        s.commit()
    engine.dispose()
    print(f"seeded {len(jobs)} jobs ({sum(j['owner_id'] == owners['alice'] for j in jobs)} of the measured owner), "
          f"{len(tags)} tags, {len(results)} result rows")
    return key


def measure(port: int, key: str, requests: int, warmup: int) -> dict[str, list[float]]:
    """Latencies of each query, one request at a time, after ``warmup`` unmeasured ones each."""
    for _label, query in QUERIES:  # warm the API's and Postgres's caches (and plans) for each query
        _timed(port, "/v1/jobs?" + query, key, warmup)
    return {label: _timed(port, "/v1/jobs?" + query, key, requests) for label, query in QUERIES}


def percentiles(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "n": len(lat)}


def _timed(port: int, path: str, key: str, n: int) -> list[float]:
    """Latencies of n sequential requests on one keep-alive connection (each checked to be a 200)."""

    async def go() -> list[float]:
        reader, writer = await asyncio.open_connection(HOST, port)
        lat = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                writer.write(get_request(path, key))
                head = await reader.readuntil(b"\r\n\r\n")
                if head[9:12] != b"200":
                    raise RuntimeError(f"{path}: {head[:40]!r}")
                length = next(int(line[15:]) for line in head.split(b"\r\n") if line[:15].lower() == b"content-length:")
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t0)
        finally:
            writer.close()
        return lat

    return asyncio.run(go())


#: the queries whose plans ``--explain`` prints: (label, tags, top-1 bits)
EXPLAINED = [("tag + top1:4w4a sort (headline)", ["paper"], "4w4a"), ("top1:4w4a sort, no filter", None, "4w4a")]


def explain(url: str, tags: list[str] | None, bits: str, owner_name: str = "alice") -> str:
    """Postgres's plan (EXPLAIN ANALYZE, after one unmeasured run) of a list query built by the
    API's own code (persistence.api_store.list_jobs), the measured owner's, 51 rows as the API asks."""
    import psycopg
    from sqlalchemy.dialects import postgresql

    from persistence import api_store

    class Capture:
        stmt: Any = None

        async def execute(self, stmt: Any) -> Any:
            Capture.stmt = stmt
            raise StopAsyncIteration

    with psycopg.connect(url) as c:
        owner = c.execute("SELECT id FROM users WHERE name = %s", (owner_name,)).fetchone()[0]
        try:
            asyncio.run(api_store.list_jobs(Capture(), owner, None, None, 51, 0, tags=tags, metric_bits=bits))  # type: ignore[arg-type]
        except StopAsyncIteration:
            pass
        sql = str(Capture.stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        c.execute(sql).fetchall()
        rows = c.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql).fetchall()
    return "\n".join(r[0] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=400, help="requests per query and phase")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured requests per query, phase and round")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; the phases alternate within each")
    ap.add_argument("--revision", default="0012", help="the migration whose indexes are measured")
    ap.add_argument("--explain", action="store_true", help="print two queries' plans in each phase (EXPLAINED)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--share", type=float, default=0.4, help="the measured owner's share of the jobs (the rest: four others)")
    args = ap.parse_args()

    import psycopg
    from alembic import command
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, text

    from persistence.migrate import alembic_config
    from persistence.settings import Settings
    from ssql_cli.stack import api_command, free_port

    db = f"ssql_bench_list_{uuid.uuid4().hex[:8]}"
    user = "postgres"
    with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=user, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{db}"')
    url = f"postgresql://{user}@{PG['host']}:{PG['port']}/{db}"
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"ssql_bench_{db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
    env.update(SSQL_HOME=str(home), SSQL_DATABASE_URL=url, SSQL_BROKER_URL=REDIS, SSQL_QUEUE=queue, SSQL_PAGE_SIZE_MAX="200")
    settings = Settings(home=home, database_url=url, broker_url=REDIS, queue=queue)
    cfg = alembic_config(settings)
    before = ScriptDirectory.from_config(cfg).get_revision(args.revision).down_revision
    assert isinstance(before, str), f"revision {args.revision} has no single parent"
    api = None
    phases: dict[str, dict[str, dict[str, float]]] = {}
    plans: dict[str, str] = {}
    try:
        command.upgrade(cfg, before)
        key = seed(settings, args.jobs, random.Random(args.seed), args.share)
        engine = create_engine(settings.sync_database_url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
        port = free_port()
        api = subprocess.Popen(api_command(HOST, port), env=env, cwd=ROOT)
        _wait_http(port, "/healthz", timeout=120)
        # The phases alternate in rounds (the order flipped every round), the schema switched by
        # the migration itself (downgrade to its parent / upgrade to it, then ANALYZE), so that
        # background load on a shared machine hits both alike.
        names = {before: f"without ({before})", args.revision: f"with {args.revision}"}
        lat: dict[str, dict[str, list[float]]] = {n: {label: [] for label, _ in QUERIES} for n in names.values()}
        current = before
        for r in range(args.rounds):
            order = [before, args.revision] if r % 2 == 0 else [args.revision, before]
            for revision in order:
                if revision != current:
                    t0 = time.perf_counter()
                    (command.upgrade if revision == args.revision else command.downgrade)(cfg, revision)
                    with engine.connect() as conn:
                        conn.execute(text("ANALYZE"))
                    current = revision
                    print(f"round {r + 1}: schema at {revision} ({time.perf_counter() - t0:.1f} s)", flush=True)
                if args.explain and names[revision] not in plans:
                    plans[names[revision]] = "\n\n".join(f"-- {label}, {names[revision]}:\n{explain(url, tags, bits)}"
                                                         for label, tags, bits in EXPLAINED)
                for label, got in measure(port, key, args.requests // args.rounds, args.warmup).items():
                    lat[names[revision]][label] += got
        phases = {n: {label: percentiles(v) for label, v in per.items()} for n, per in lat.items()}
        engine.dispose()
    finally:
        if api is not None:
            api.terminate()
            api.wait(15)
        with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=user, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    from ssql_core.runtime import cpu_name

    print(f"\nGET /v1/jobs (limit 50), {args.jobs} jobs ({args.share:.0%} the measured owner's), {args.requests} sequential "
          f"requests per query and phase in {args.rounds} alternating rounds; {cpu_name()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    (p0, s0), (p1, s1) = phases.items()
    print(f"{'query':<34} {p0:>26} {p1:>26}   p99 ratio")
    for label, _ in QUERIES:
        a, b = s0[label], s1[label]
        print(f"{label:<34} p50 {a['p50_ms']:6.1f} p99 {a['p99_ms']:6.1f} ms   p50 {b['p50_ms']:6.1f} p99 {b['p99_ms']:6.1f} ms"
              f"   {a['p99_ms'] / b['p99_ms']:5.2f}x")
    for plan in plans.values():
        print(f"\n{plan}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
