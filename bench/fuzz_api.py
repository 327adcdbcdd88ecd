"""Schemathesis against the live API (Postgres mode, a valid key, every phase), no training.

    nice -n 10 .venv/bin/python bench/fuzz_api.py [--examples 200] [--seed 8] [--max-time SECONDS]

Starts, on 127.0.0.1 only: a fresh Postgres database on the shared server (db ``test``'s
server, dropped at the end), the real API (one uvicorn process) with a Redis queue of its own
name that no worker reads (submitted jobs stay ``queued``: nothing trains), and an API key. Then
runs ``schemathesis run`` in a subprocess over every operation with

* every phase of the installed schemathesis (examples, coverage, fuzzing, stateful),
* every check (``--checks all``: no 5xx, status codes, content types, headers and bodies that
  conform to the schema, schema-violating requests rejected (negative data, unsupported methods,
  missing required headers), schema-valid requests accepted, authentication not ignored),
* both generation modes (positive and negative), a fixed seed and deterministic generation.

``DELETE /v1/keys/current`` revokes the key it is called with, so it runs last in a run of its
own with a key of its own (after it every answer is the documented 401); so does
``DELETE /v1/keys/{key_id}`` (it may name the fuzzer's own key).

Prints one JSON line (cases, failures, duration, machine) and exits 1 on any failure. The
service test ``tests/service/test_fuzz_schemathesis.py`` runs the same function with a small
``--examples``. Reports (JUnit XML, NDJSON events) go to ``--report-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PG = {"host": "127.0.0.1", "port": 5432, "admin_db": "test"}
REDIS_URL = "redis://127.0.0.1:6379/9"
REVOKE_PATH = "/v1/keys/current"
#: revokes a key by id: the fuzzer's own among them (ids are small integers), so it runs on its own too
REVOKE_BY_ID_PATH = "/v1/keys/{key_id}"


def _pg_user() -> str:
    import psycopg

    for user in ("postgres", "root"):
        try:
            with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=user, connect_timeout=3):
                return user
        except psycopg.OperationalError:
            continue
    raise SystemExit("Postgres is not reachable on 127.0.0.1:5432 (db 'test', user postgres or root)")


class FuzzStack:
    """A fresh database, an API process without a worker (a queue nobody reads), keys."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.db = f"ssql_fuzz_{uuid.uuid4().hex[:10]}"
        self.queue = f"fuzz-noworker-{uuid.uuid4().hex[:8]}"
        self.user = _pg_user()
        self.url = f"postgresql://{self.user}@{PG['host']}:{PG['port']}/{self.db}"
        self.stack = None  # type: ignore[var-annotated]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
        env.update(
            SSQL_HOME=str(self.home),
            SSQL_DATABASE_URL=self.url,
            SSQL_BROKER_URL=REDIS_URL,
            SSQL_QUEUE=self.queue,
            SSQL_DEVICE="cpu",
        )
        return env

    def __enter__(self) -> FuzzStack:
        import psycopg

        from persistence.migrate import upgrade_head
        from persistence.settings import Settings
        from ssql_cli.stack import Stack, api_command, free_port

        with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=self.user, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{self.db}"')
        self.settings = Settings(home=self.home, database_url=self.url, broker_url=REDIS_URL, queue=self.queue)
        upgrade_head(self.settings)
        self.stack = Stack(self.env(), free_port(), log_dir=self.home / "logs")
        # the API only: no worker reads this queue, so nothing the fuzzer submits ever trains
        self.stack.api = self.stack._spawn(api_command(self.stack.host, self.stack.port), "api")
        self.stack.wait_ready(90)
        return self

    def key(self, name: str) -> str:
        from persistence.db import make_engine, make_sessionmaker
        from persistence.keys import create_key

        engine = make_engine(self.settings)
        try:
            with make_sessionmaker(engine)() as s:
                return create_key(s, name)
        finally:
            engine.dispose()

    def __exit__(self, *exc: object) -> None:
        import psycopg
        import redis

        if self.stack is not None:
            self.stack.stop()
        try:
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).delete(self.queue)
        except redis.RedisError:
            pass
        with psycopg.connect(host=PG["host"], port=PG["port"], dbname=PG["admin_db"], user=self.user, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


class Canceller:
    """Cancels the fuzzer's queued jobs about once a second (through the API, as a user would):
    with no worker a job never ends, and the streaming routes (``/events``, ``/logs?follow``)
    stay open until it does. A cancelled job's stream answers its last state and ends."""

    def __init__(self, base_url: str, key: str, period: float = 1.0) -> None:
        import threading

        self.base_url, self.key, self.period = base_url, key, period
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.cancelled = 0

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=10) as c:
            while not self.stop.wait(self.period):
                try:
                    page = c.get("/v1/jobs", params={"status": "queued", "limit": 1000})
                    if page.status_code != 200:
                        continue
                    for job in page.json()["items"]:
                        if c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202:
                            self.cancelled += 1
                except httpx.HTTPError:
                    continue

    def __enter__(self) -> Canceller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)


def schemathesis_command(base_url: str, key: str, examples: int, seed: int, report_dir: Path, name: str,
                         extra: list[str]) -> list[str]:  # fmt: skip
    exe = Path(sys.executable).with_name("schemathesis")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "schemathesis.cli"]
    return [
        *cmd, "--no-color", "run", f"{base_url}/openapi.json",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--checks", "all",
        # replaced by fuzz_hooks.positive_data_acceptance_but_references (a source_job must exist)
        "--exclude-checks", "positive_data_acceptance",
        "--mode", "all",
        "--max-examples", str(examples),
        "--seed", str(seed),
        "--generation-deterministic",
        "--continue-on-failure",
        "--workers", "1",
        "--request-timeout", "10",
        "--suppress-health-check", "all",
        "-H", f"Authorization: Bearer {key}",
        "--report", "junit,ndjson",
        "--report-junit-path", str(report_dir / f"{name}.junit.xml"),
        "--report-ndjson-path", str(report_dir / f"{name}.ndjson"),
        *extra,
    ]  # fmt: skip


def _count_cases(ndjson: Path) -> int:
    """Test cases sent (every phase), from the NDJSON event stream's ScenarioFinished events."""
    cases = 0
    if not ndjson.exists():
        return 0
    for line in ndjson.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        for kind, body in event.items():
            if kind == "ScenarioFinished" and isinstance(body, dict):
                recorder = body.get("recorder") or {}
                cases += len(recorder.get("cases") or {})
    return cases


def _junit_failures(path: Path) -> list[str]:
    if not path.exists():
        return [f"no JUnit report at {path}"]
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error"):
                out.append(f"{case.get('name')}: {(child.get('message') or child.text or '').strip()[:2000]}")
    return out


def fuzz(examples: int = 200, seed: int = 8, max_time: float | None = None, report_dir: Path | None = None,
         timeout: float = 3600.0) -> dict:  # fmt: skip
    """Run the whole fuzz; returns a summary (``failures`` lists each failing check)."""
    report_dir = report_dir or Path(tempfile.mkdtemp(prefix="ssql_fuzz_reports_"))
    report_dir.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="ssql_fuzz_home_"))
    t0 = time.monotonic()
    runs: list[dict] = []
    try:
        with FuzzStack(home) as fs:
            extra_main = ["--exclude-path", REVOKE_PATH, "--exclude-path", REVOKE_BY_ID_PATH]
            if max_time:
                extra_main += ["--max-time", str(int(max_time))]
            plan = [
                ("main", fs.key("fuzzer"), extra_main),
                ("revoke", fs.key("fuzzer-revoke"), ["--include-path", REVOKE_PATH]),
                ("revoke-by-id", fs.key("fuzzer-revoke-by-id"), ["--include-path", REVOKE_BY_ID_PATH]),
            ]
            env = {**os.environ, "SCHEMATHESIS_HOOKS": str(ROOT / "bench" / "fuzz_hooks.py")}
            for name, key, extra in plan:
                cmd = schemathesis_command(fs.stack.url, key, examples, seed, report_dir, name, extra)
                t = time.monotonic()
                with Canceller(fs.stack.url, key):
                    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=report_dir, env=env)
                (report_dir / f"{name}.out.txt").write_text(proc.stdout + proc.stderr)
                runs.append({
                    "name": name, "rc": proc.returncode, "seconds": round(time.monotonic() - t, 1),
                    "cases": _count_cases(report_dir / f"{name}.ndjson"),
                    "failures": _junit_failures(report_dir / f"{name}.junit.xml"),
                    "tail": (proc.stdout + proc.stderr)[-4000:],
                })  # fmt: skip
            api_log = (home / "logs" / "api.log").read_text(errors="replace") if (home / "logs" / "api.log").exists() else ""
    finally:
        shutil.rmtree(home, ignore_errors=True)
    failures = [f for r in runs for f in r["failures"]]
    failures += [f"schemathesis run {r['name']!r} exited {r['rc']}" for r in runs if r["rc"] != 0 and not r["failures"]]
    return {
        "cases": sum(r["cases"] for r in runs),
        "failures": failures,
        "seconds": round(time.monotonic() - t0, 1),
        "examples": examples,
        "seed": seed,
        "schemathesis": _version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {_cpu()}",
        "runs": runs,
        "report_dir": str(report_dir),
        "api_tracebacks": api_log.count("Traceback"),
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("schemathesis")
    except Exception:  # noqa: BLE001
        return "?"


def _cpu() -> str:
    from ssql_core.runtime import cpu_name  # lazily: it imports torch

    return cpu_name()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=200, help="schemathesis --max-examples per operation and phase")
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--max-time", type=float, default=None, help="time budget of the main run (seconds)")
    ap.add_argument("--report-dir", type=Path, default=None)
    args = ap.parse_args()
    summary = fuzz(args.examples, args.seed, args.max_time, args.report_dir)
    brief = {k: v for k, v in summary.items() if k != "runs"}
    brief["runs"] = [{k: v for k, v in r.items() if k != "tail"} for r in summary["runs"]]
    print(json.dumps(brief, indent=2))
    for r in summary["runs"]:
        print(f"--- schemathesis run {r['name']} (tail)\n{r['tail']}", file=sys.stderr)
    sys.exit(1 if summary["failures"] else 0)


if __name__ == "__main__":
    main()
