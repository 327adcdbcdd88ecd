"""How a caller follows and steers a run: progress events, metrics, cancellation.

The worker implements :class:`Hooks` to write progress into its database and to read the job's
cancel flag; the CLI implements it to print a progress line. ssql_core itself never knows who
is listening.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Progress:
    """One progress report. ``fraction`` is in [0, 1]; rates are images per second."""

    phase: str  # "pretrain", "calibrate", "linear", "knn", "distill", "export"
    epoch: int
    epochs: int
    step: int  # global optimisation step (or work item) within this phase
    total_steps: int
    fraction: float
    loss: float | None = None
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Hooks:
    """Default hooks: do nothing, never stop. Subclass and override what you need."""

    #: how many optimisation steps between two ``should_stop`` checks / progress reports
    every_n_steps: int = 5

    def on_progress(self, progress: Progress) -> None:  # noqa: B027 - optional override
        """Called every ``every_n_steps`` steps and at every epoch end."""

    def should_stop(self) -> bool:
        """Return True to cancel the run; the trainer then raises :class:`Cancelled`."""
        return False

    def on_checkpoint(self, path: Path, epoch: int, step: int) -> None:  # noqa: B027
        """Called after a resumable training checkpoint was written atomically."""
