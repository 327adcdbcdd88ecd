"""Start an API process and a Celery worker process on this machine, wait until ready, stop them.

Used by ``ssql up`` and ``ssql demo`` (embedded: SQLite + filesystem broker under SSQL_HOME) and by
the service tests (Postgres + Redis): the processes read everything from the environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


class PortInUse(RuntimeError):
    """Something (often another ``ssql up``) already listens on the address."""


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` if ``host:port`` cannot be bound (as uvicorn would bind it)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise PortInUse(f"port {port} on {host} is already in use ({e.strerror}); is another `ssql up` "
                            "running? stop it or choose another port with --port") from None  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_command(queue: str, name: str = "ssql") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "-Q", queue, "--concurrency", "1", "--pool", "prefork", "-n", f"{name}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "INFO",
    ]  # fmt: skip


def api_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "api.app:app", "--host", host, "--port", str(port), "--log-level", "warning"]


class Stack:
    """An API and a worker as child processes (each in its own process group)."""

    def __init__(self, env: dict[str, str], port: int, host: str = "127.0.0.1", log_dir: Path | None = None) -> None:
        self.env, self.host, self.port, self.log_dir = env, host, port, log_dir
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._worker_starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"{name}.log").open("ab")
        return subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)

    def start_worker(self) -> subprocess.Popen:
        self._worker_starts += 1
        queue = self.env.get("SSQL_QUEUE", "gpu")
        self.worker = self._spawn(worker_command(queue, f"ssql{self._worker_starts}"), "worker")
        return self.worker

    def start(self, timeout: float = 60.0) -> Stack:
        """Start the API, wait until it answers, then start the worker. Raises :class:`PortInUse`
        when the port is taken (before starting anything), RuntimeError when the API exits."""
        check_port_free(self.host, self.port)
        self.api = self._spawn(api_command(self.host, self.port), "api")
        self.start_worker()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(f"the API process exited with code {self.api.returncode}")
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    time.sleep(0.2)  # a readiness answer from another process on the port would
                    if self.api is not None and self.api.poll() is not None:  # come with ours exiting
                        raise RuntimeError(f"the API process exited with code {self.api.returncode} "
                                           f"(is port {self.port} taken by another server?)")  # fmt: skip
                    return
                last = r.text
            except httpx.HTTPError as e:
                last = str(e)
            time.sleep(0.25)
        raise TimeoutError(f"the API did not become ready in {timeout:.0f} s: {last}")

    @staticmethod
    def _stop(proc: subprocess.Popen | None, grace: float, group: bool = True) -> None:
        """SIGTERM (to the process group, or with ``group=False`` to the main process only, which
        stops its own children), SIGKILL to the group after ``grace`` seconds or for leftovers."""
        if proc is None or proc.poll() is not None:
            return
        try:
            if group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:
                os.kill(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        if not group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_worker(self) -> None:
        """``kill -9`` the worker's whole process group (main and pool processes)."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def stop(self, grace: float = 10.0) -> None:
        # the worker as `docker compose stop` stops it: SIGTERM to the Celery main process (a warm
        # shutdown: a running job is handed back; idle pool processes end without an ERROR line)
        self._stop(self.worker, grace, group=False)
        self._stop(self.api, grace)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class OwnRedis:
    """A throwaway ``redis-server`` on a free loopback port with no persistence (a restart loses
    every message), for tests and the chaos script that kill and restart the broker: never the
    shared one."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.workdir = free_port(), Path(workdir)
        self.pidfile = self.workdir / "redis.pid"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(self.workdir),
             "--logfile", str(self.workdir / "redis.log")],
            check=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("own redis-server did not start")

    def kill(self) -> None:
        if not self.pidfile.exists():
            return
        pid = int(self.pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        while _pid_alive(pid):
            time.sleep(0.02)
        self.pidfile.unlink(missing_ok=True)

    def blip(self, down_s: float) -> None:
        """Kill the server, wait ``down_s`` seconds, start it again (empty)."""
        self.kill()
        time.sleep(down_s)
        self.start()


def postgres_bindir() -> Path | None:
    """The folder of ``initdb`` / ``pg_ctl``: on PATH, or Debian's /usr/lib/postgresql/<newest>/bin."""
    import shutil

    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


class OwnPostgres:
    """A throwaway Postgres cluster (``initdb``) on a free loopback port, data and socket in a
    folder of its own under the system's temp folder, no fsync: for tests and the chaos script
    that stop and restart the database (never the shared server on 5432). As root the server
    runs as the ``postgres`` user (``initdb`` refuses root)."""

    def __init__(self) -> None:
        import tempfile

        bindir = postgres_bindir()
        if bindir is None:
            raise FileNotFoundError("no pg_ctl / initdb (Debian: apt-get install postgresql)")
        self.bindir, self.port = bindir, free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ssql_pg_"))
        self.data = self.root / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)

    def init(self) -> OwnPostgres:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                  "-E", "UTF8", "--locale", "C")  # fmt: skip
        return self

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """``immediate``: every server process quits at once, like a crash (recovery at the next start)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def blip(self, down_s: float) -> None:
        """Stop the server at once, wait ``down_s`` seconds, start it again (its data kept)."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def destroy(self) -> None:
        import shutil

        try:
            self.stop("fast")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
