"""Entry point of the training subprocess: ``python -m worker.runner JOB_FILE``.

It runs one ssql_core call (pretrain, evaluate, export or distill) and reports to its supervisor through JSON
lines on the file descriptor named by ``SSQL_EVENT_FD``; it never touches the database. CUDA is
initialised only here, in a freshly exec'd interpreter, never in a forked Celery process.
SIGTERM asks the run to stop at the next step (ssql_core raises ``Cancelled``). SIGUSR1 asks it
to stop at its next checkpoint (a graceful worker stop hands the job back: ``handed_back``).
It writes only into its own attempt folder; the supervisor publishes checkpoints as the job's
while it holds the lease. A lease watchdog kills the runner (its whole process group) when the
supervisor stops renewing its lease (supervisor stalled, e.g. SIGSTOP), before another attempt
can be given the job (docs/decisions/010).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss, SSQLError
from ssql_core.hooks import Hooks, Progress

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED, EXIT_HANDED_BACK = 0, 2, 3, 4


class EventHooks(Hooks):
    """Forwards progress and checkpoints to the supervisor; stops when SIGTERM arrived."""

    def __init__(self, events: TextIO, handback_seconds: float = 60.0) -> None:
        self.events = events
        self.stop_requested = False
        #: monotonic time of a hand-back request (graceful worker stop), and how long to wait
        #: for a checkpoint that coincides with a stop check before stopping anyway
        self.handback_at: float | None = None
        self.handback_seconds = handback_seconds
        self._progress_step: int | None = None
        self._checkpoint_step: int | None = None

    def emit(self, event: str, **data: Any) -> None:
        self.events.write(json.dumps({"event": event, **data}, default=str) + "\n")
        self.events.flush()
        log_event(event, data)

    def on_progress(self, progress: Progress) -> None:
        self._progress_step = progress.step
        self.emit("progress", **asdict(progress))

    def should_stop(self) -> bool:
        if self.stop_requested:
            return True
        if self.handback_at is None:
            return False
        # hand back at a checkpoint (nothing to redo) when a stop check falls on one, else once
        # the hand-back time is up (the next attempt redoes the steps since the last checkpoint)
        at_checkpoint = self._checkpoint_step is not None and self._checkpoint_step == self._progress_step
        return at_checkpoint or time.monotonic() - self.handback_at >= self.handback_seconds

    def on_checkpoint(self, path: Path, epoch: int, step: int) -> None:
        self._checkpoint_step = step
        self.emit("checkpoint", path=str(path), epoch=epoch, step=step)


#: the job log (stderr, kept by the supervisor per attempt; GET /v1/jobs/{id}/logs): one
#: readable line per event, progress at most every LOG_PROGRESS_S seconds or at a new epoch/phase
LOG_PROGRESS_S = 2.0
_last_logged: dict[str, Any] = {"t": 0.0, "key": None}


def log_event(event: str, data: dict[str, Any]) -> None:
    now = time.monotonic()
    if event == "progress":
        key = (data.get("phase"), data.get("epoch"))
        if key == _last_logged["key"] and now - _last_logged["t"] < LOG_PROGRESS_S and data.get("fraction") != 1.0:
            return
        _last_logged.update(t=now, key=key)
        names = ("phase", "epoch", "epochs", "step", "total_steps", "loss", "lr", "images_per_s", "fraction")
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k in names if (v := data.get(k)) is not None)
        line = f"progress {fields}"
    elif event == "result":
        line = f"result: {', '.join(sorted(data))}"
    else:
        line = f"{event}: " + " ".join(f"{k}={v}" for k, v in data.items() if v is not None)
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {line}\n")
    sys.stderr.flush()


def _lease_watchdog(fd: int) -> None:
    """Kill this process group once the lease the supervisor last reported has run out.

    The supervisor writes a ``time.monotonic()`` deadline (one line) after every lease renewal; a
    supervisor that stalls (SIGSTOP, swapped out) or dies stops writing, and this runner must not
    go on training (and writing) past the moment another attempt may be given the job."""
    deadline: list[float] = [time.monotonic() + 3600.0]
    eof = threading.Event()

    def read() -> None:
        with os.fdopen(fd, "r") as f:
            for line in f:
                try:
                    deadline[0] = float(line)
                except ValueError:
                    pass
        eof.set()

    threading.Thread(target=read, name="ssql-lease-reader", daemon=True).start()
    while True:
        if eof.wait(0.1) or time.monotonic() > deadline[0]:
            why = "its supervisor is gone" if eof.is_set() else "its lease was not renewed in time"
            sys.stderr.write(f"runner: stopping, {why}\n")
            sys.stderr.flush()
            os.killpg(os.getpgrp(), signal.SIGKILL)


class CorruptArtifact(SSQLError):
    """A server file this job reads does not match the sha256 registered when its job succeeded."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify_inputs(job: dict[str, Any]) -> None:
    """Check the source files (``checkpoint``: the pretrain's last.pt, ``heads``: the eval's
    heads.pt) against the digests the API pinned in ``config.input_sha256`` (removed from the
    config here, before the library sees it). A mismatch raises :class:`CorruptArtifact`."""
    expected = job["config"].pop("input_sha256", None) or {}
    paths = dict(job.get("paths") or {})
    if job["config"].get("checkpoint"):  # eval / finetune: the source's last.pt is in the config
        paths.setdefault("checkpoint", job["config"]["checkpoint"])
    for name, digest in expected.items():
        path = paths.get(name)
        if not path:
            continue
        actual = _sha256(Path(path))
        if actual != digest:
            raise CorruptArtifact(
                f"the {Path(path).name} of the source job has changed on disk since it was written "
                f"(sha256 {actual}, registered {digest}); it is corrupt: run the job that wrote it again"
            )


class ExportFailed(SSQLError):
    """ssql_core.export refused the request (ValueError with the reason): retrying cannot help."""


@contextmanager
def _exporting() -> Iterator[None]:
    try:
        yield
    except SSQLError:
        raise
    except ValueError as e:
        raise ExportFailed(f"export failed: {e}") from e


def _output(path: Path, workdir: Path, bits: str, fmt: str, owner: str = "self") -> dict[str, Any]:
    """A file for the supervisor to register: path relative to the workdir; ``owner`` "source" =
    served under the source job's id (export jobs)."""
    return {"bits": bits, "format": fmt, "file": str(path.relative_to(workdir)), "owner": owner}


def _bits_name(bits: Any) -> str:
    """A ``bits`` entry's name: the bit-width string, or a per-layer map's label (``mixed-...``)."""
    if isinstance(bits, dict):
        from ssql_core.bitconfig import parse_bit_config

        return parse_bit_config(bits).label
    return str(bits)


def _export_pretrain(job: dict[str, Any], workdir: Path, checkpoint: Path) -> list[dict[str, Any]]:
    """The pretrain job's deployable files: packed safetensors at ``export_bits`` (one calibration)
    and, when torchvision has the architecture (width 1), the FP torchvision file."""
    from ssql_core.export import export_checkpoints

    config, out_dir = job["config"], workdir / "exports"
    outputs = []
    bits = job.get("export_bits") or []
    if bits:
        with _exporting():
                paths = export_checkpoints(checkpoint, bits, out_dir, fmt="safetensors", source_job=job.get("job_id"),
                                       device=config.get("device", "cpu"))
        outputs += [_output(p, workdir, b, "safetensors") for p, b in zip(paths, bits, strict=True)]
    if float(config.get("width", 1.0)) == 1.0:
        try:
            (path,) = export_checkpoints(checkpoint, ["fp"], out_dir, fmt="torchvision", source_job=job.get("job_id"))
        except ValueError:  # an architecture torchvision does not have: no such file, by design
            pass
        else:
            outputs.append(_output(path, workdir, "fp", "torchvision"))
    return outputs


def _run_export(job: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Export job: the source's checkpoint at ``bits`` x ``formats`` (one load + calibration per format)."""
    from ssql_core.export import export_checkpoints

    config, paths = job["config"], job["paths"]
    heads = paths.get("heads")
    outputs, files = [], []
    if job.get("source_kind") == "finetune":  # the fine-tuned classifier at its own bits
        from ssql_core.finetune import export_finetuned

        (b,) = config["bits"]
        for fmt in config["formats"]:
            with _exporting():
                p = export_finetuned(paths["checkpoint"], workdir / "exports" / f"classifier-{b}{'.onnx' if fmt == 'onnx' else '.safetensors'}", fmt)
            outputs.append(_output(p, workdir, b, fmt, owner="source"))
            files.append({"bits": b, "format": fmt, "file": p.name})
        return {"summary": {"source_job": job.get("source_job"), "files": files}, "outputs": outputs}
    for fmt in config["formats"]:
        with _exporting():
            written = export_checkpoints(paths["checkpoint"], config["bits"], workdir / "exports", fmt=fmt, heads=heads,
                                         source_job=job.get("pretrain_job"), device=config.get("device", "cpu"),
                                         calibration=config.get("calibration"), calib_percentile=config.get("calib_percentile"),
                                         ptq_state_dir=workdir,
                                         **{k: config[k] for k in ("ptq", "ptq_images", "ptq_iters", "brecq_learn_act", "onnx_form")
                                            if config.get(k) is not None})
        for p, b in zip(written, config["bits"], strict=True):
            b = _bits_name(b)  # a per-layer map is registered (and downloaded) by its label
            outputs.append(_output(p, workdir, b, fmt, owner="source"))
            files.append({"bits": b, "format": fmt, "file": p.name})
    for state in workdir.glob("ptq-*.pt"):  # reconstruction states: every format is written
        state.unlink(missing_ok=True)
    return {"summary": {"source_job": job.get("source_job"), "files": files}, "outputs": outputs}


def _run_distill(job: dict[str, Any], workdir: Path, hooks: EventHooks) -> dict[str, Any]:
    """SQAKD: one result row (protocol "sqakd"); the student as a packed file for psq/lsq."""
    from ssql_core.distill import DistillConfig, distill
    from ssql_core.distill.export import export_student

    config = dict(job["config"], **job["paths"])
    result = distill(DistillConfig.from_dict(config), workdir, hooks)
    student = Path(result["student"])
    result["student"] = student.name
    row = {**result, "protocol": "sqakd"}
    summary: dict[str, Any] = {k: result.get(k) for k in ("bits", "quantizer", "top1", "ptq_top1", "teacher_top1",
                                                          "gain_over_ptq", "kl_start", "kl_end", "labels_used")}
    outputs = []
    try:
        packed = export_student(student, workdir / f"student-{result['bits']}.safetensors")
    except ValueError as e:  # pact / dorefa / ewgs grids have no zero level: no packed file (reason kept)
        summary.update(packed_checkpoint=None, no_packed_checkpoint_reason=str(e))
    else:
        summary["packed_checkpoint"] = packed.name
        outputs.append(_output(packed, workdir, str(result["bits"]), "safetensors"))
    return {"summary": summary, "results": [row], "outputs": outputs}


def _run_finetune(job: dict[str, Any], workdir: Path, hooks: EventHooks) -> dict[str, Any]:
    """Supervised fine-tuning at one bit-width: one result row (protocol "finetune") with its
    per-epoch curve; the classifier packed at its bits (psq/lsq, or FP weights at ``fp``)."""
    from ssql_core.finetune import FINETUNED, FinetuneConfig, export_finetuned, finetune

    result = finetune(FinetuneConfig.from_dict(job["config"]), workdir, hooks)
    summary: dict[str, Any] = {k: result.get(k) for k in ("bits", "quantizer", "act_ranges", "dataset", "top1", "ptq_linear_top1",
                                                          "start_top1", "gain_over_ptq_linear", "epochs", "final_loss")}
    outputs = []
    try:
        packed = export_finetuned(workdir / FINETUNED, workdir / f"classifier-{result['bits']}.safetensors")
    except ValueError as e:  # pact / dorefa / ewgs grids have no zero level: no packed file (reason kept)
        summary.update(packed_checkpoint=None, no_packed_checkpoint_reason=str(e))
    else:
        summary["packed_checkpoint"] = packed.name
        outputs.append(_output(packed, workdir, str(result["bits"]), "safetensors"))
    outputs.append(_output(workdir / FINETUNED, workdir, str(result["bits"]), "torch"))
    return {"summary": summary, "results": [result], "outputs": outputs}


def _run(job: dict[str, Any], hooks: EventHooks) -> dict[str, Any]:
    kind, workdir, config = job["kind"], Path(job["workdir"]), job["config"]
    if kind != "pretrain":
        verify_inputs(job)
    if kind == "pretrain":
        from ssql_core.config import PretrainConfig
        from ssql_core.train import pretrain

        summary = pretrain(PretrainConfig.from_dict(config), workdir, hooks)
        try:
            outputs = _export_pretrain(job, workdir, Path(summary.get("checkpoint") or workdir / "last.pt"))
        except ExportFailed as e:  # e.g. a QAT baseline's own quantizers: the trained model stands, say why no files
            outputs, summary["exports_skipped"] = [], str(e)
        # file names only: server paths are none of the user's business (files are served by the API)
        for key in ("checkpoint", "backbone"):
            if isinstance(summary.get(key), str):
                summary[key] = Path(summary[key]).name
        summary["exports"] = [{"bits": o["bits"], "format": o["format"]} for o in outputs]
        from ssql_core.runtime import device_kind

        summary["device_kind"] = device_kind(str(config.get("device") or "auto"))  # throughput records (decision 014)
        return {"summary": summary, "outputs": outputs}
    if kind == "eval":
        from ssql_core.config import EvalConfig
        from ssql_core.evaluate import HEADS, evaluate
        from ssql_core.export import export_checkpoints

        rows = evaluate(EvalConfig.from_dict(config), workdir, hooks)
        outputs: list[dict[str, Any]] = []
        summary: dict[str, Any] = {"rows": len(rows)}
        if (workdir / HEADS).is_file():  # linear protocol: a classifier file per evaluated bit-width
            # per-layer maps (and autobit's choice, which may equal a given map) by their label: heads.pt holds each map
            bits = list(dict.fromkeys(r["bits"] for r in rows))
            try:
                with _exporting():
                    paths = export_checkpoints(config["checkpoint"], bits, workdir / "exports", heads=workdir / HEADS,
                                               source_job=job.get("source_job"), device=config.get("device", "cpu"))
            except ExportFailed as e:  # the evaluation itself stands
                summary["exports_skipped"] = str(e)
            else:
                outputs = [_output(p, workdir, b, "safetensors") for p, b in zip(paths, bits, strict=True)]
        summary["classifiers"] = [o["bits"] for o in outputs]
        return {"summary": summary, "results": rows, "outputs": outputs}
    if kind == "export":
        return _run_export(job, workdir)
    if kind == "distill":
        return _run_distill(job, workdir, hooks)
    if kind == "finetune":
        return _run_finetune(job, workdir, hooks)
    raise ConfigError("kind", f"this worker cannot run jobs of kind {kind!r}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during (``__cause__`` / ``__context__``)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _checkpoint_read(exc: BaseException) -> tuple[bool, str | None]:
    """Whether ``exc`` was raised while reading a checkpoint (torch.load, safetensors, loading a
    state dict), and the file's path when ssql_core's loader knew it."""
    for e in _causes(exc):
        hit, path = type(e).__name__ == "SafetensorError", None
        tb = e.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            filename = code.co_filename.replace("\\", "/")
            if filename.endswith("ssql_core/checkpoint.py") and code.co_name == "load":
                hit, path = True, tb.tb_frame.f_locals.get("path")
            elif filename.endswith("torch/serialization.py") and code.co_name in ("load", "_load", "_legacy_load"):
                hit = True
            elif filename.endswith("torch/nn/modules/module.py") and code.co_name == "load_state_dict":
                hit = True
            elif "/safetensors/" in filename:
                hit = True
            tb = tb.tb_next
        if hit:
            return True, None if path is None else str(path)
    return False, None


def classify_crash(exc: BaseException, job: dict[str, Any]) -> dict[str, Any]:
    """The ``error`` event of an unexpected exception: errors no retry can fix are final
    (``invalid_config`` for a ConfigError raised under another exception, ``corrupt_checkpoint``
    for a truncated or unreadable checkpoint); anything else is ``crashed`` and retried."""
    for e in _causes(exc):
        if isinstance(e, ConfigError):
            return {"code": "invalid_config", "field": e.field, "message": str(e), "retryable": False}
    is_checkpoint, path = _checkpoint_read(exc)
    if is_checkpoint:
        workdir = str(job.get("workdir") or "")
        own = path is not None and workdir and path.startswith(workdir.rstrip("/") + "/")
        where = f"the checkpoint {Path(path).name} of " + ("this job" if own else "the source job") if path else "a checkpoint"
        error: dict[str, Any] = {
            "code": "corrupt_checkpoint",
            "message": f"{where} is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc}); "
            "retrying cannot help: run the job that wrote it again",
            "retryable": False,
        }
        if job.get("kind") != "pretrain" and not own:
            error["field"] = "source_job"
        return error
    return {"code": "crashed", "message": f"{type(exc).__name__}: {exc}", "retryable": True}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    expected_parent = int(os.environ.get("SSQL_SUPERVISOR_PID", "0"))
    if expected_parent and os.getppid() != expected_parent:
        return EXIT_ERROR  # the supervisor died before we could arm the parent-death signal
    events = os.fdopen(int(os.environ["SSQL_EVENT_FD"]), "w", buffering=1)
    hooks = EventHooks(events, float(os.environ.get("SSQL_HANDBACK_SECONDS", "60")))
    if os.environ.get("SSQL_LEASE_FD"):
        threading.Thread(target=_lease_watchdog, args=(int(os.environ["SSQL_LEASE_FD"]),), name="ssql-lease",
                         daemon=True).start()  # fmt: skip

    def _on_term(_signum: int, _frame: Any) -> None:
        hooks.stop_requested = True

    def _on_handback(_signum: int, _frame: Any) -> None:
        if hooks.handback_at is None:
            hooks.handback_at = time.monotonic()

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    signal.signal(signal.SIGUSR1, _on_handback)
    job = json.loads(Path(argv[0]).read_text())
    source = job.get("dataset_source")
    try:
        if source:
            from storage import DigestMismatch, StoreUnavailable
            from worker.datasets import fetch

            try:
                downloaded = fetch(source, job["config"])
            except DigestMismatch as e:
                hooks.emit("error", code="corrupt_artifact", field="dataset", message=f"dataset {source['name']}: {e}", retryable=False)
                return EXIT_ERROR
            except StoreUnavailable as e:  # not the job's fault: the supervisor hands it back, attempt not spent
                hooks.emit("error", code="store_unavailable", message=f"dataset {source['name']}: {e}", retryable=True)
                return EXIT_ERROR
            log_event("dataset", {"name": source["name"], "sha256": source["sha256"], "cache": "miss" if downloaded else "hit"})
        out = _run(job, hooks)
    except Cancelled as e:
        if hooks.handback_at is not None and not hooks.stop_requested:
            hooks.emit("handed_back", message=str(e), step=hooks._checkpoint_step)
            return EXIT_HANDED_BACK
        hooks.emit("cancelled", message=str(e))
        return EXIT_CANCELLED
    except ConfigError as e:
        hooks.emit("error", code="invalid_config", field=e.field, message=str(e), retryable=False)
        return EXIT_ERROR
    except NonFiniteLoss as e:
        from ssql_core.ptq import ReconstructionDiverged  # its message says what diverged

        hooks.emit("error", code="non_finite_loss", message=str(e) if isinstance(e, ReconstructionDiverged) else f"training diverged: {e}",
                   retryable=False)
        return EXIT_ERROR
    except ExportFailed as e:
        hooks.emit("error", code="export_error", message=str(e), retryable=False)
        return EXIT_ERROR
    except CorruptArtifact as e:
        hooks.emit("error", code="corrupt_artifact", field="source_job", message=str(e), retryable=False)
        return EXIT_ERROR
    except SSQLError as e:
        hooks.emit("error", code="training_error", message=str(e), retryable=False)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, which decides on a retry
        traceback.print_exc()
        hooks.emit("error", **classify_crash(e, job))
        return EXIT_ERROR
    if source:
        from worker.datasets import rename_back

        rename_back(out, source)
    from ssql_core.runtime import peak_memory

    # the job's actual peak memory, next to its estimate in summary.cost (persistence/throughput.py)
    out["summary"] = {**(out.get("summary") or {}), "peak_memory": peak_memory()}
    hooks.emit("result", **out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
