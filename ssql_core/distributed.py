"""One pretraining run on several devices: one process per device, DistributedDataParallel.

``pretrain`` calls :func:`launch` when ``cfg.devices`` > 1. The calling process (the worker's
runner, the CLI, a test) becomes the coordinator: it starts ``devices`` ranks with
``torch.multiprocessing`` (spawn: fresh interpreters, CUDA initialised only in them), NCCL on
``cuda:0..N-1``, or gloo CPU processes where CUDA is absent or ``device="cpu"``. The ranks train
in lock-step (each takes an equal, disjoint part of every global batch; the bit pair is drawn from
(seed, step), the same on every rank); rank 0 writes ``last.pt`` / ``backbone.pt`` and reports.

Rank 0 forwards progress and checkpoint events to the coordinator over a pipe and asks it
``should_stop`` at every report step, so the caller's :class:`Hooks` see exactly what a
single-device run shows (in the same order, synchronously); the answer is broadcast to every
rank, which then all stop at the same step. The ranks ignore SIGTERM / SIGINT / SIGUSR1 (the
supervisor signals the whole process group; the coordinator decides) and die with their
coordinator (PR_SET_PDEATHSIG). A rank that dies (killed, out of memory) makes the coordinator
kill the others and raise :class:`RankFailed`: the attempt fails as a crash (retried) and the
next attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import signal
import socket
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from ssql_core.config import PretrainConfig
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss, SSQLError
from ssql_core.hooks import Hooks, Progress

#: after one rank failed, how long the others may take to report before they are killed
FAILURE_GRACE_S = 10.0


class RankFailed(RuntimeError):
    """A rank died or raised an unexpected error; retryable (not an SSQLError): the next attempt
    resumes from the last checkpoint."""


def backend_for(cfg: PretrainConfig) -> tuple[str, str]:
    """(process-group backend, device type) of a multi-device run."""
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"device {cfg.device!r} requested but CUDA is not available")
    return ("nccl", "cuda") if use_cuda else ("gloo", "cpu")


def check_devices(cfg: PretrainConfig) -> tuple[str, str]:
    backend, kind = backend_for(cfg)
    if kind == "cuda" and torch.cuda.device_count() < cfg.devices:
        raise ConfigError("devices", f"asks for {cfg.devices} GPUs; this worker has {torch.cuda.device_count()}")
    if kind == "cpu" and cfg.sync_bn:
        raise ConfigError("sync_bn", "SyncBatchNorm needs CUDA devices; this run uses CPU processes (gloo)")
    return backend, kind


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _RankZeroHooks(Hooks):
    """Rank 0's hooks: everything goes to the coordinator, which calls the caller's hooks."""

    def __init__(self, conn: Connection, every_n_steps: int) -> None:
        self.conn = conn
        self.every_n_steps = every_n_steps

    def on_progress(self, progress: Progress) -> None:
        self.conn.send(("progress", progress))

    def on_checkpoint(self, path: Path, epoch: int, step: int) -> None:
        self.conn.send(("checkpoint", str(path), epoch, step))

    def should_stop(self) -> bool:
        self.conn.send(("should_stop",))
        return bool(self.conn.recv())


class _QuietHooks(Hooks):
    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


#: what a rank runs: ``run(cfg, workdir, hooks, rank, world)`` -> the run's summary (a module-level
#: function, so the spawned process can import it: ``ssql_core.train.run_rank``)
RankRun = Callable[[PretrainConfig, Path, Hooks, int, int], dict[str, Any]]


def _rank_main(rank: int, world: int, port: int, backend: str, cfg_dict: dict[str, Any], workdir: str,
               every_n_steps: int, threads: int, conn: Connection, run: RankRun) -> None:
    """One rank: train, then send ("result", kind, payload) to the coordinator."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _die_with_parent()
    import datetime

    import torch.distributed as dist

    if threads > 0:
        torch.set_num_threads(threads)
    result: tuple[Any, ...]
    try:
        cfg = PretrainConfig.from_dict(cfg_dict).validate()
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=30))
        hooks: Hooks = _RankZeroHooks(conn, every_n_steps) if rank == 0 else _QuietHooks(every_n_steps)
        result = ("ok", run(cfg, Path(workdir), hooks, rank, world))
    except Cancelled as e:
        result = ("cancelled", str(e))
    except NonFiniteLoss as e:
        result = ("non_finite", str(e))
    except ConfigError as e:
        result = ("config", e.field, e.reason)
    except SSQLError as e:
        result = ("ssql", f"{type(e).__name__}: {e}")
    except BaseException:  # noqa: BLE001 - reported to the coordinator
        result = ("error", traceback.format_exc())
    try:
        conn.send(("result", *result))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        conn.close()


def launch(cfg: PretrainConfig, workdir: Path, hooks: Hooks, run: RankRun) -> dict[str, Any]:
    """Run ``run`` for ``cfg`` on ``cfg.devices`` ranks (module docstring) and return rank 0's
    summary. The caller (``ssql_core.train.pretrain``) checks a checkpoint to resume from first."""
    import torch.multiprocessing as mp

    backend, kind = check_devices(cfg)
    world = cfg.devices
    threads = max(1, torch.get_num_threads() // world) if kind == "cpu" else 0
    ctx = mp.get_context("spawn")
    port = _free_port()
    conns, procs = [], []
    for rank in range(world):
        parent, child = ctx.Pipe(duplex=True)
        p = ctx.Process(target=_rank_main, name=f"ssql-rank{rank}",
                        args=(rank, world, port, backend, cfg.to_dict(), str(workdir), int(hooks.every_n_steps), threads, child, run))
        p.start()
        child.close()
        conns.append(parent)
        procs.append(p)
    results: dict[int, tuple[Any, ...]] = {}
    failed_at: float | None = None
    try:
        open_conns = dict(enumerate(conns))
        while len(results) < world:
            sentinels = {p.sentinel: r for r, p in enumerate(procs) if p.exitcode is None}
            ready = wait([*open_conns.values(), *sentinels], timeout=1.0)
            for obj in ready:
                rank = next((r for r, c in open_conns.items() if c is obj), None)
                if rank is None:
                    continue
                try:
                    msg = obj.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    del open_conns[rank]
                    continue
                if msg[0] == "progress":
                    hooks.on_progress(msg[1])
                elif msg[0] == "checkpoint":
                    hooks.on_checkpoint(Path(msg[1]), msg[2], msg[3])
                elif msg[0] == "should_stop":
                    obj.send(hooks.should_stop())  # type: ignore[union-attr]
                elif msg[0] == "result":
                    results[rank] = msg[1:]
                    if msg[1] != "ok" and failed_at is None:
                        failed_at = time.monotonic()
            for r, p in enumerate(procs):
                if p.exitcode is not None and r not in results and r not in open_conns:  # gone without a word
                    results[r] = ("died", p.exitcode)
                    failed_at = failed_at or time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
                break
    finally:
        for p in procs:
            if p.exitcode is None and (failed_at is not None or len(results) < world):
                p.kill()
        for p in procs:
            p.join(timeout=30)
        for c in conns:
            c.close()
    try:
        return _outcome(results, world)
    except RankFailed:
        # a cancel (SIGTERM to the whole group) that reached a rank before it ignored SIGTERM
        if hooks.should_stop():
            raise Cancelled("cancelled while the ranks were starting or stopping") from None
        raise


def _outcome(results: dict[int, tuple[Any, ...]], world: int) -> dict[str, Any]:
    """Rank 0's summary, or the most telling failure of any rank as the exception it was."""
    kinds = {r: res[0] for r, res in results.items()}
    if len(results) == world and all(k == "ok" for k in kinds.values()):
        return dict(results[0][1])
    for _, res in sorted(results.items()):
        if res[0] == "config":
            raise ConfigError(res[1], res[2])
    for _, res in sorted(results.items()):
        if res[0] == "non_finite":
            raise NonFiniteLoss(res[1])
    for r, res in sorted(results.items()):
        if res[0] == "ssql":
            raise SSQLError(f"rank {r}: {res[1]}")
    for r, res in sorted(results.items()):  # a dead rank first: the others' errors are its echo
        if res[0] == "died":
            code = res[1]
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            raise RankFailed(f"rank {r} {how} before finishing; this attempt failed, the next one resumes from the last checkpoint")
    for r, res in sorted(results.items()):
        if res[0] == "error":
            raise RankFailed(f"rank {r} failed:\n{res[1]}")
    if all(k == "cancelled" for k in kinds.values()) and len(results) == world:
        raise Cancelled(results[0][1])
    missing = sorted(set(range(world)) - set(results))
    raise RankFailed(f"ranks {missing} did not report after another rank stopped ({kinds}); the attempt failed")
