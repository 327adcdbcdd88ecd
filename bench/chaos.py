"""Chaos run: tiny jobs through the real stack while workers, runners, supervisors and Redis fail.

    nice -n 10 .venv/bin/python bench/chaos.py --minutes 6 [--seed 8] [--workers 2] [--in-flight 4]

Loopback only, bounded in time. It starts its own pieces: a fresh Postgres database on the
shared server (127.0.0.1:5432, dropped at the end), its OWN ``redis-server`` on a free port
(no persistence: a restart loses every message; the shared 6379 is never touched), the API and
``--workers`` Celery workers. For ``--minutes`` it keeps ``--in-flight`` tiny pretrain jobs
(TINY of tests/service/conftest.py, 2-4 epochs) submitted and, at random intervals (seeded),
injects one fault:

* ``kill_worker``: SIGKILL a worker's process group (main + pool), restarted after 1-3 s;
* ``kill_runner``: SIGKILL a running job's training process;
* ``stop_supervisor``: SIGSTOP the pool process supervising a running job, SIGCONT after 1-8 s
  (the lease is 4 s: short stops must cost nothing, long ones hand the job to another worker);
* ``redis_restart``: SIGKILL the own Redis, start it again 1-3 s later (empty).

Then it stops injecting, waits (at most ``--drain-minutes``) for every job to end and reports
(one JSON document; ``--out`` writes it too):

* jobs submitted / succeeded / failed / lost (not terminal at the end);
* faults injected, by type;
* duplicate runs: two training processes of one job alive (not stopped) at the same moment,
  sampled every 0.2 s from the process table; and attempt rows of one job whose
  ``[started_at, ended_at]`` overlap (a row closed late because its supervisor was stopped shows
  here without a second live runner: both are reported);
* attempts per job, and every extra attempt attributed: to a fault aimed at that attempt's
  runner or supervisor (or its worker), or else, when a Redis restart fell within it, to a
  broker blip. Target: 0 lost, 0 duplicate runs, 0 attempts spent on broker blips.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from ssql_cli.stack import OwnRedis, Stack, api_command, free_port, worker_command  # noqa: E402

PG = {"host": "127.0.0.1", "port": 5432, "admin_db": "test"}
TINY = {
    "kind": "pretrain", "method": "ssql", "backbone": "resnet18", "dataset": "synthetic", "batch_size": 16,
    "image_size": 16, "width": 0.0625, "max_samples": 64, "checkpoint_every_steps": 4,
}  # fmt: skip
TERMINAL = ("succeeded", "failed", "cancelled")


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def _aware(t: datetime | None) -> datetime | None:
    """Postgres timestamps without a zone are UTC here."""
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _pg_user() -> str:
    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=user, connect_timeout=3):
                return user
        except psycopg.OperationalError:
            continue
    raise SystemExit("Postgres is not reachable on 127.0.0.1:5432 (db 'test', user postgres or root)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _group_pids(pgid: int) -> set[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout
    return {int(p) for p, g in (line.split() for line in ps.splitlines() if line.strip()) if int(g) == pgid}


def runner_processes() -> dict[int, tuple[str, int, bool]]:
    """pid -> (job id, attempt, stopped) of every live ``worker.runner`` process of this machine
    (its argument is the attempt's job file, ``.../jobs/<job id>/attempt-<n>.json``)."""
    out: dict[int, tuple[str, int, bool]] = {}
    ps = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 3 or "worker.runner" not in parts[2] or parts[1].startswith("Z"):
            continue
        path = Path(parts[2].split()[-1])
        m = re.fullmatch(r"attempt-(\d+)\.json", path.name)
        if m and path.parent.parent.name == "jobs":
            out[int(parts[0])] = (path.parent.name, int(m.group(1)), parts[1].startswith("T"))
    return out


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.home = Path(tempfile.mkdtemp(prefix="ssql_chaos_"))
        self.db = f"ssql_chaos_{uuid.uuid4().hex[:10]}"
        self.user = _pg_user()
        self.db_url = f"postgresql://{self.user}@{PG['host']}:{PG['port']}/{self.db}"
        self.redis = OwnRedis(self.home)
        self.workers: dict[str, subprocess.Popen] = {}
        self.worker_starts = 0
        self.faults: list[dict] = []  # {type, at (utc), pids: [...], job}
        self.jobs: list[str] = []
        self.live_duplicates: list[dict] = []
        self.stop_sampling = threading.Event()
        self.lock = threading.Lock()

    # ------------------------------------------------------------------ setup / teardown
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
        env.update(
            SSQL_HOME=str(self.home), SSQL_DATABASE_URL=self.db_url, SSQL_BROKER_URL=self.redis.url,
            SSQL_QUEUE="chaos", SSQL_DEVICE="cpu", SSQL_MAX_EPOCHS="50", SSQL_MAX_ATTEMPTS=str(self.args.max_attempts),
            SSQL_LEASE_SECONDS="4", SSQL_HEARTBEAT_SECONDS="0.5", SSQL_RECONCILE_SECONDS="1",
            SSQL_STALE_QUEUED_SECONDS="5", SSQL_CANCEL_GRACE_SECONDS="5", SSQL_TORCH_THREADS="1",
            SSQL_HANDBACK_SECONDS="10",
        )  # fmt: skip
        return env

    def setup(self) -> None:
        from persistence.db import make_engine, make_sessionmaker
        from persistence.keys import create_key
        from persistence.migrate import upgrade_head
        from persistence.settings import Settings

        with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=self.user, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.db}"')
        self.redis.start()
        settings = Settings(home=self.home, database_url=self.db_url, broker_url=self.redis.url, queue="chaos")
        upgrade_head(settings)
        engine = make_engine(settings)
        with make_sessionmaker(engine)() as s:
            self.key = create_key(s, "chaos")
        engine.dispose()
        self.stack = Stack(self.env(), free_port(), log_dir=self.home / "logs")
        self.stack.api = self.stack._spawn(api_command(self.stack.host, self.stack.port), "api")
        self.stack.wait_ready(90)
        for _ in range(self.args.workers):
            self.start_worker()
        self.client = httpx.Client(base_url=self.stack.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def start_worker(self) -> str:
        self.worker_starts += 1
        name = f"chaos{self.worker_starts}"
        self.workers[name] = self.stack._spawn(worker_command("chaos", name), f"worker-{name}")
        return name

    def teardown(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        for proc in self.workers.values():
            Stack._stop(proc, 10)
        for pid in self.own_runners():  # training processes of this run's jobs only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if getattr(self, "stack", None) is not None:
            Stack._stop(self.stack.api, 10)
        try:
            self.client.close()
        except AttributeError:
            pass
        self.redis.kill()
        with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=self.user, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        if not self.args.keep:
            shutil.rmtree(self.home, ignore_errors=True)

    # ------------------------------------------------------------------ observation
    def own_runners(self) -> dict[int, tuple[str, int, bool]]:
        mine = set(self.jobs)
        return {pid: v for pid, v in runner_processes().items() if v[0] in mine}

    def sample(self) -> None:
        """Every 0.2 s: two live (not stopped) runners of one job at once is a duplicate run."""
        seen: set[tuple] = set()
        while not self.stop_sampling.wait(0.2):
            by_job: dict[str, list[tuple[int, int]]] = defaultdict(list)
            for pid, (job, attempt, stopped) in self.own_runners().items():
                if not stopped:
                    by_job[job].append((attempt, pid))
            for job, runs in by_job.items():
                if len({a for a, _ in runs}) > 1:
                    key = (job, tuple(sorted(runs)))
                    if key not in seen:
                        seen.add(key)
                        with self.lock:
                            self.live_duplicates.append({"job": job, "runs": sorted(runs), "at": now_utc().isoformat()})

    def running_attempts(self) -> list[dict]:
        rows = []
        with psycopg.connect(self.db_url) as c:
            for job_id, attempt, worker, pid in c.execute(
                "SELECT a.job_id, a.attempt, a.worker, a.pid FROM job_attempts a JOIN jobs j ON j.id = a.job_id "
                "WHERE a.ended_at IS NULL AND j.status = 'running'"
            ):
                rows.append({"job": job_id, "attempt": attempt, "worker": worker, "runner": pid})
        return rows

    # ------------------------------------------------------------------ faults
    def fault(self, kind: str, **info: object) -> None:
        with self.lock:
            self.faults.append({"type": kind, "at": now_utc(), **info})

    def kill_worker(self) -> None:
        live = [n for n, p in self.workers.items() if p.poll() is None]
        if not live:
            return
        name = self.rng.choice(live)
        proc = self.workers[name]
        group = _group_pids(proc.pid)  # main + pool: an attempt row names its pool process ("host:pid")
        pool = [a for a in self.running_attempts() if a["worker"].rsplit(":", 1)[-1].isdigit()
                and int(a["worker"].rsplit(":", 1)[1]) in group]  # fmt: skip
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.fault("kill_worker", worker=name, attempts=[(a["job"], a["attempt"]) for a in pool])
        time.sleep(self.rng.uniform(1, 3))
        del self.workers[name]
        self.start_worker()

    def kill_runner(self) -> None:
        running = [a for a in self.running_attempts() if a["runner"] and _alive(a["runner"])]
        if not running:
            return
        a = self.rng.choice(running)
        try:
            os.kill(a["runner"], signal.SIGKILL)
        except ProcessLookupError:
            return
        self.fault("kill_runner", attempts=[(a["job"], a["attempt"])], pid=a["runner"])

    def stop_supervisor(self) -> None:
        running = [a for a in self.running_attempts() if ":" in a["worker"]]
        if not running:
            return
        a = self.rng.choice(running)
        pid = int(a["worker"].rsplit(":", 1)[1])
        seconds = round(self.rng.uniform(1, 8), 1)
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        self.fault("stop_supervisor", attempts=[(a["job"], a["attempt"])], pid=pid, seconds=seconds)
        time.sleep(seconds)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def redis_restart(self) -> None:
        down = round(self.rng.uniform(1, 3), 1)
        self.redis.kill()
        self.fault("redis_restart", seconds=down)
        time.sleep(down)
        self.redis.start()

    # ------------------------------------------------------------------ the run
    def submit_some(self) -> None:
        try:
            items = self.client.get("/v1/jobs", params={"limit": 1000}).json()["items"]
        except (httpx.HTTPError, ValueError, KeyError):
            return
        open_jobs = [j for j in items if j["status"] not in TERMINAL]
        for _ in range(max(0, self.args.in_flight - len(open_jobs))):
            epochs = self.rng.randint(2, 4)
            try:
                r = self.client.post("/v1/jobs", json={**TINY, "epochs": epochs, "seed": self.rng.randint(0, 999)})
            except httpx.HTTPError:
                continue
            if r.status_code == 201:
                self.jobs.append(r.json()["id"])

    def run(self) -> dict:
        t0 = time.monotonic()
        self.setup()
        sampler = threading.Thread(target=self.sample, daemon=True)
        sampler.start()
        faults = [self.kill_worker, self.kill_runner, self.stop_supervisor, self.redis_restart]
        deadline = time.monotonic() + self.args.minutes * 60
        next_fault = time.monotonic() + self.rng.uniform(5, 10)
        try:
            while time.monotonic() < deadline:
                self.submit_some()
                if time.monotonic() >= next_fault:
                    self.rng.choice(faults)()
                    next_fault = time.monotonic() + self.rng.uniform(self.args.min_gap, self.args.max_gap)
                time.sleep(0.5)
            chaos_s = time.monotonic() - t0
            drain_deadline = time.monotonic() + self.args.drain_minutes * 60
            statuses: dict[str, str] = {}
            while time.monotonic() < drain_deadline:
                statuses = self.statuses()
                if all(s in TERMINAL for s in statuses.values()):
                    break
                time.sleep(1)
            self.stop_sampling.set()
            sampler.join(5)
            report = self.report(statuses, chaos_s, time.monotonic() - t0)
        finally:
            self.stop_sampling.set()
            self.teardown()
        return report

    def statuses(self) -> dict[str, str]:
        with psycopg.connect(self.db_url) as c:
            return {jid: st for jid, st in c.execute("SELECT id, status FROM jobs")}

    # ------------------------------------------------------------------ the report
    def report(self, statuses: dict[str, str], chaos_s: float, total_s: float) -> dict:
        with psycopg.connect(self.db_url) as c:
            jobs = {r[0]: {"status": r[1], "attempts": r[2], "error": r[3]} for r in
                    c.execute("SELECT id, status, attempts, error FROM jobs")}  # fmt: skip
            attempts = [(r[0], r[1], r[2], r[3], _aware(r[4]), _aware(r[5]), r[6]) for r in c.execute(
                "SELECT job_id, attempt, worker, pid, started_at, ended_at, outcome FROM job_attempts ORDER BY job_id, attempt")]  # fmt: skip
        end = now_utc()
        by_job: dict[str, list[tuple]] = defaultdict(list)
        for row in attempts:
            by_job[row[0]].append(row)
        overlaps = []
        for job, rows in by_job.items():
            for i, a in enumerate(rows):
                for b in rows[i + 1:]:
                    a_end = a[5] or end
                    if b[4] < a_end and a[4] < (b[5] or end):
                        overlaps.append({"job": job, "attempts": [a[1], b[1]], "outcomes": [a[6], b[6]],
                                         "overlap_s": round((min(a_end, b[5] or end) - b[4]).total_seconds(), 2)})  # fmt: skip
        targeted = defaultdict(list)  # (job, attempt) -> fault types aimed at it
        for f in self.faults:
            for job, attempt in f.get("attempts", []):
                targeted[(job, attempt)].append(f["type"])
        blips = [f for f in self.faults if f["type"] == "redis_restart"]
        spent: Counter = Counter()
        unexplained = []
        for job, rows in by_job.items():
            for row in rows:
                _, attempt, _, _, started, ended, outcome = row
                if outcome in ("succeeded", "handed_back", "cancelled"):
                    continue
                if targeted.get((job, attempt)):
                    spent[targeted[(job, attempt)][0]] += 1
                    continue
                during = [f for f in blips if started <= f["at"] <= (ended or end)]
                key = "redis_restart (broker blip)" if during else "unattributed"
                spent[key] += 1
                unexplained.append({"job": job, "attempt": attempt, "outcome": outcome, "broker_blip_during": bool(during),
                                    "error": jobs.get(job, {}).get("error")})  # fmt: skip
        terminal = Counter(j["status"] for j in jobs.values())
        per_job = Counter(j["attempts"] for j in jobs.values())
        stopped_long = [f for f in self.faults if f["type"] == "stop_supervisor" and f["seconds"] > 4]
        return {
            "minutes": self.args.minutes, "seed": self.args.seed, "workers": self.args.workers,
            "chaos_seconds": round(chaos_s, 1), "total_seconds": round(total_s, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, {_cpu()}",
            "jobs_submitted": len(jobs), "jobs_by_status": dict(terminal),
            "jobs_lost": sum(1 for j in jobs.values() if j["status"] not in TERMINAL),
            "failed_jobs": {jid: j["error"] for jid, j in jobs.items() if j["status"] == "failed"},
            "faults": dict(Counter(f["type"] for f in self.faults)),
            "supervisor_stops_longer_than_lease": len(stopped_long),
            "duplicate_runs_live": len(self.live_duplicates), "duplicate_runs_live_detail": self.live_duplicates[:20],
            "attempt_rows_overlapping": len(overlaps), "attempt_rows_overlapping_detail": overlaps[:20],
            "attempts_total": len(attempts), "jobs_by_attempts": {str(k): v for k, v in sorted(per_job.items())},
            "extra_attempts_by_cause": dict(spent),
            "attempts_spent_on_broker_blips": spent.get("redis_restart (broker blip)", 0),
            "unexplained_attempts": unexplained[:20],
            "attempt_outcomes": dict(Counter(r[6] for r in attempts)),
        }  # fmt: skip


def _cpu() -> str:
    from ssql_core.runtime import cpu_name  # lazily: it imports torch

    return cpu_name()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6.0, help="how long faults are injected")
    ap.add_argument("--drain-minutes", type=float, default=6.0, help="at most this long to wait for the jobs afterwards")
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--in-flight", type=int, default=4, help="jobs kept submitted (queued or running)")
    ap.add_argument("--max-attempts", type=int, default=10, help="SSQL_MAX_ATTEMPTS of the run's jobs")
    ap.add_argument("--min-gap", type=float, default=4.0, help="seconds between faults, at least")
    ap.add_argument("--max-gap", type=float, default=12.0, help="seconds between faults, at most")
    ap.add_argument("--out", type=Path, default=None, help="write the report (JSON) here too")
    ap.add_argument("--keep", action="store_true", help="keep the run's home folder (logs)")
    args = ap.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    report = Chaos(args).run()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = report["jobs_lost"] == 0 and report["duplicate_runs_live"] == 0 and report["attempts_spent_on_broker_blips"] == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
