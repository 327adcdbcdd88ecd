"""Entry point of the training subprocess: ``python -m worker.runner JOB_FILE``.

It runs one ssql_core call (pretrain or evaluate) and reports to its supervisor through JSON
lines on the file descriptor named by ``SSQL_EVENT_FD``; it never touches the database. CUDA is
initialised only here, in a freshly exec'd interpreter, never in a forked Celery process.
SIGTERM asks the run to stop at the next step (ssql_core raises ``Cancelled``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss, SSQLError
from ssql_core.hooks import Hooks, Progress

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 2, 3


class EventHooks(Hooks):
    """Forwards progress and checkpoints to the supervisor; stops when SIGTERM arrived."""

    def __init__(self, events: TextIO) -> None:
        self.events = events
        self.stop_requested = False

    def emit(self, event: str, **data: Any) -> None:
        self.events.write(json.dumps({"event": event, **data}, default=str) + "\n")
        self.events.flush()

    def on_progress(self, progress: Progress) -> None:
        self.emit("progress", **asdict(progress))

    def should_stop(self) -> bool:
        return self.stop_requested

    def on_checkpoint(self, path: Path, epoch: int, step: int) -> None:
        self.emit("checkpoint", path=str(path), epoch=epoch, step=step)


def _run(job: dict[str, Any], hooks: EventHooks) -> dict[str, Any]:
    kind, workdir, config = job["kind"], Path(job["workdir"]), job["config"]
    if kind == "pretrain":
        from ssql_core.config import PretrainConfig
        from ssql_core.train import pretrain

        summary = pretrain(PretrainConfig.from_dict(config), workdir, hooks)
        # file names only: server paths are none of the user's business (files are served by the API)
        for key in ("checkpoint", "backbone"):
            if isinstance(summary.get(key), str):
                summary[key] = Path(summary[key]).name
        return {"summary": summary}
    if kind == "eval":
        from ssql_core.config import EvalConfig
        from ssql_core.evaluate import evaluate

        rows = evaluate(EvalConfig.from_dict(config), workdir, hooks)
        return {"summary": {"rows": len(rows)}, "results": rows}
    raise ConfigError("kind", f"this worker cannot run jobs of kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    expected_parent = int(os.environ.get("SSQL_SUPERVISOR_PID", "0"))
    if expected_parent and os.getppid() != expected_parent:
        return EXIT_ERROR  # the supervisor died before we could arm the parent-death signal
    events = os.fdopen(int(os.environ["SSQL_EVENT_FD"]), "w", buffering=1)
    hooks = EventHooks(events)

    def _on_term(_signum: int, _frame: Any) -> None:
        hooks.stop_requested = True

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    job = json.loads(Path(argv[0]).read_text())
    try:
        out = _run(job, hooks)
    except Cancelled as e:
        hooks.emit("cancelled", message=str(e))
        return EXIT_CANCELLED
    except ConfigError as e:
        hooks.emit("error", code="invalid_config", field=e.field, message=str(e), retryable=False)
        return EXIT_ERROR
    except NonFiniteLoss as e:
        hooks.emit("error", code="non_finite_loss", message=f"training diverged: {e}", retryable=False)
        return EXIT_ERROR
    except SSQLError as e:
        hooks.emit("error", code="training_error", message=str(e), retryable=False)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, which decides on a retry
        traceback.print_exc()
        hooks.emit("error", code="crashed", message=f"{type(e).__name__}: {e}", retryable=True)
        return EXIT_ERROR
    hooks.emit("result", **out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
