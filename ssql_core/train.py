"""Self-supervised pretraining loop: deterministic, resumable, observable, cancellable.

``pretrain(cfg, workdir)`` writes ``workdir/last.pt`` (full resumable state) every
``cfg.checkpoint_every_steps`` steps and at each epoch end, and ``workdir/backbone.pt`` (the FP
backbone's state_dict with torchvision's names) at the end. If ``last.pt`` exists when it starts,
it resumes from it exactly: 2 epochs straight and 1 + resume + 1 give identical weights.

The loop does not wait for the device at every step (docs/decisions/012): the loss and its
finiteness stay on the device and are read every few steps (at each progress report, checkpoint
and epoch end, and at least every ``FINITE_CHECK_EVERY`` steps), so a non-finite loss stops the
run within that many steps and before any checkpoint could hold it. The two views come from the
device (``device_views``: batched, for in-memory datasets) or from DataLoader workers (per
image), as ``cfg.input_pipeline`` says. ``cfg.devices`` > 1 runs one process per device under
DistributedDataParallel (``distributed``); rank 0 writes checkpoints and reports progress.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ssql_core import checkpoint as ckpt
from ssql_core.config import PRESETS, TRAINING_BEHAVIOURS, PretrainConfig
from ssql_core.data import SeededViews, load_split, pretrain_transform, stats_key_for
from ssql_core.device_views import DeviceViews, in_memory_images
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.hooks import Hooks, Progress
from ssql_core.losses import representation_std
from ssql_core.methods import Method, build_method
from ssql_core.runtime import (
    autocast,
    compile_modules,
    resolve_device,
    seed_everything,
    to_input,
    use_channels_last,
)

LAST, BACKBONE = "last.pt", "backbone.pt"
#: the most steps between two reads of the loss (finiteness) from the device
FINITE_CHECK_EVERY = 8
#: config fields a resumed run must share with the checkpoint it resumes
RESUME_KEYS = ("method", "backbone", "dataset", "width", "image_size", "seed", "batch_size", "epochs", "max_samples")


def cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def bit_pair_counts(sampler: Any, steps: int) -> dict[str, int]:
    """How often each (w, a) pair was drawn in steps ``0 .. steps-1`` (the sampler is a pure
    function of (seed, step), so this is exact for a resumed run too), most frequent first."""
    counts: dict[str, int] = {}
    for step in range(steps):
        key = str(sampler.sample(step))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def build_optimizer(model: Method, cfg: PretrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's shuffled order of the ``n`` images (on the CPU), a pure function of its inputs."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, drop_last: bool = True, multiple: int = 1) -> list[list[int]]:
    """The epoch's shuffled batches, a pure function of its inputs. The last partial batch is
    dropped, or with ``drop_last=False`` kept when it holds at least 2 images per device
    (BatchNorm needs two), cut to a ``multiple`` of the devices."""
    perm = epoch_permutation(n, seed, epoch).tolist()
    bs = min(batch_size, n)
    batches = [perm[i * bs:(i + 1) * bs] for i in range(n // bs)]
    rest = (n % bs) // multiple * multiple
    if not drop_last and rest >= 2 * multiple:
        batches.append(perm[n // bs * bs:n // bs * bs + rest])
    return batches


def load_pretrained(path: str | Path, map_location: str = "cpu") -> tuple[PretrainConfig, Method]:
    """Rebuild a method (backbone + heads) from a pretrain checkpoint."""
    state = ckpt.load(path, map_location)
    if state.get("kind") != "pretrain":
        raise ConfigError("checkpoint", f"{path} is not a pretrain checkpoint (last.pt)")
    # checkpoints from before a behaviour existed were trained with ours: a preset must not
    # re-resolve a behaviour they never had
    d = dict(state["config"])
    for name in TRAINING_BEHAVIOURS:
        d.setdefault(name, PRESETS[None][name])
    cfg = PretrainConfig.from_dict(d)
    model = build_method(cfg)
    model.load_state_dict(state["model"])
    return cfg, model


class _StepModule(nn.Module):
    """One training step as a module's forward: what DistributedDataParallel wraps (its gradient
    hooks need the forward to run through it). ``metrics`` keeps the step's plain-number metrics."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method
        self.metrics: dict[str, float] = {}

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.method.training_step(x1, x2, step)
        self.metrics = out.metrics
        return out.loss, out.z


class _RunBatches:
    """Batch sampler over every remaining epoch: one DataLoader (and its workers) for the whole
    run. Items are (epoch, index) so that SeededViews seeds each image's views by its epoch."""

    def __init__(self, trainer: _Trainer) -> None:
        self.trainer = trainer
        self.plan = list(trainer.remaining())

    def __len__(self) -> int:
        return sum(max(0, count - start) for _, start, count in self.plan)

    def __iter__(self):  # type: ignore[no-untyped-def]
        t = self.trainer
        for epoch, start, count in self.plan:
            batches = t.batches(epoch)
            for b in range(start, count):
                yield [(epoch, i) for i in t.shard_of(batches[b])]


class _Trainer:
    def __init__(self, cfg: PretrainConfig, workdir: Path, hooks: Hooks, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.workdir, self.hooks = cfg, workdir, hooks
        self.rank, self.world, self.is_main = rank, world, rank == 0
        device = resolve_device(cfg.device)
        self.device = torch.device("cuda", rank) if device.type == "cuda" and world > 1 else device
        self.channels_last = use_channels_last(self.device, cfg.channels_last)
        seed_everything(cfg.seed)
        split = load_split(cfg.dataset, True, cfg.image_size, cfg.data_root, cfg.allow_download, cfg.max_samples, cfg.seed)
        self.n = len(split.data)  # type: ignore[arg-type]
        self.pipeline = resolve_pipeline(cfg.input_pipeline, split.data, self.device)
        stats_key = stats_key_for(split.stats_key, cfg.normalization)
        self.views: DeviceViews | None = None
        if self.pipeline == "device":
            images = in_memory_images(split.data)
            assert images is not None
            self.views = DeviceViews(images, cfg.image_size, stats_key, cfg.seed, self.device)
        self.data = SeededViews(split.data, pretrain_transform(cfg.image_size, stats_key), cfg.seed)
        self.steps_per_epoch = len(self.batches(0))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.model = build_method(cfg).to(self.device)
        if world > 1 and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:
            self.model.qctx.to(self.device)
            compile_modules(self.model)
        self.step_module = _StepModule(self.model)
        self.step_fn: nn.Module = self.step_module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.step_fn = DistributedDataParallel(self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = build_optimizer(self.model, cfg)
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.last_loss: float | None = None
        # device-side watch of the loss: the first non-finite step (-1: none) and its value
        self._bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)
        self._loss: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._trace = _trace_file(rank)

    # -- state -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "kind": "pretrain",
            "format_version": ckpt.FORMAT_VERSION,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": {"type": "cosine", "base_lr": self.cfg.lr, "total_steps": self.total_steps},
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "bit_sampler": self.model.sampler.state_dict(),
            "rng": ckpt.rng_state(),
            "last_loss": self.last_loss,
        }

    def restore(self, path: Path) -> None:
        state = read_resumable(path, self.cfg, self.device)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch, self.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        self.last_loss = state.get("last_loss")
        ckpt.set_rng_state(state["rng"])

    def save(self) -> None:
        if not self.is_main:
            return
        path = self.workdir / LAST
        ckpt.save_atomic(self.state(), path)
        self.hooks.on_checkpoint(path, self.epoch, self.global_step)

    # -- inputs ----------------------------------------------------------------------------
    def remaining(self) -> list[tuple[int, int, int]]:
        """(epoch, first batch, batches in the epoch) from where the run stands to its end."""
        return [(e, self.batch_in_epoch if e == self.epoch else 0, self.steps_per_epoch) for e in range(self.epoch, self.cfg.epochs)]

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (``drop_last`` decides the last partial one)."""
        return epoch_batches(self.n, self.cfg.batch_size, self.cfg.seed, epoch, bool(self.cfg.drop_last), self.world)

    def shard_of(self, batch: list[int]) -> list[int]:
        """This rank's equal, disjoint part of a global batch."""
        k = len(batch) // self.world
        return batch[self.rank * k:(self.rank + 1) * k]

    def inputs(self):  # type: ignore[no-untyped-def]
        """Yields the two views of every remaining step, on the device."""
        if self.views is not None:
            bs = min(self.cfg.batch_size, self.n)
            sizes = [len(b) for b in self.batches(0)]  # the same every epoch
            for epoch, start, count in self.remaining():
                perm = epoch_permutation(self.n, self.cfg.seed, epoch).to(self.device, non_blocking=True)
                for b in range(start, count):
                    k = sizes[b] // self.world
                    shard = slice(self.rank * k, (self.rank + 1) * k)
                    x1, x2 = self.views.views(epoch, b, perm[b * bs:b * bs + sizes[b]], shard)
                    yield to_input(x1, self.device, self.channels_last), to_input(x2, self.device, self.channels_last)
            return
        workers = self.cfg.num_workers
        loader = DataLoader(self.data, batch_sampler=_RunBatches(self), num_workers=workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if workers else None,
                            persistent_workers=workers > 0)
        for x1, x2 in loader:
            yield to_input(x1, self.device, self.channels_last), to_input(x2, self.device, self.channels_last)

    # -- loop ------------------------------------------------------------------------------
    def _watch(self, loss: torch.Tensor, step: int) -> None:
        """Remember the first non-finite loss on the device (no host read)."""
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_loss = torch.where(first, loss.detach(), self._bad_loss)

    def _check_finite(self) -> None:
        """One host read of the loss; every rank raises together when any rank's loss diverged."""
        assert self._loss is not None
        local_bad, bad_step, bad_loss, loss = torch.stack([
            (self._bad_step >= 0).double(), self._bad_step.double(), self._bad_loss.double(), self._loss.double()]).tolist()
        any_bad = bool(local_bad)
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([local_bad, loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            any_bad, loss = bool(t[0].item() > 0), float(t[1].item()) / self.world
        if any_bad:
            step = int(bad_step) if local_bad else self.global_step - 1
            value = bad_loss if local_bad else "non-finite on another device"
            raise NonFiniteLoss(
                f"loss became {value} at epoch {step // self.steps_per_epoch + 1}, step {step}: "
                f"lower the learning rate (lr={self.cfg.lr}) or check the input data"
            )
        self.last_loss = loss

    def _agree(self, flag: bool) -> bool:
        """Rank 0's decision, the same on every rank."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.broadcast(t, 0)
        return bool(t.item() > 0)

    def run(self) -> dict[str, Any]:
        cfg, hooks = self.cfg, self.hooks
        self.model.train()
        every = max(1, int(hooks.every_n_steps))
        check_every = min(every, FINITE_CHECK_EVERY)
        window_t, window_imgs = time.perf_counter(), 0
        images_per_s: float | None = None
        metrics: dict[str, float] = {}
        for x1, x2 in self.inputs():
            # the reference steps its cosine once per epoch (at the epoch's start), ours every step
            lr = (cosine_lr(cfg.lr, self.epoch, cfg.epochs) if cfg.lr_step == "epoch"
                  else cosine_lr(cfg.lr, self.global_step, self.total_steps))
            for g in self.opt.param_groups:
                g["lr"] = lr
            with autocast(self.device, cfg.amp):
                loss, z = self.step_fn(x1, x2, self.global_step)
            loss = loss.float()
            self._watch(loss, self.global_step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.model.after_optimizer_step(self.global_step, self.total_steps)
            self._loss, self._z = loss.detach(), z
            if self._trace is not None:
                self._trace_step()
            self.global_step += 1
            self.batch_in_epoch += 1
            window_imgs += len(x1) * self.world
            epoch_end = self.batch_in_epoch == self.steps_per_epoch
            if epoch_end:
                self.epoch += 1
                self.batch_in_epoch = 0
            save_now = epoch_end or self.global_step % cfg.checkpoint_every_steps == 0
            report = epoch_end or self.global_step % every == 0
            if save_now or report or self.global_step % check_every == 0:
                self._check_finite()
            if save_now:
                self.save()
            if report:
                now = time.perf_counter()
                images_per_s = window_imgs / max(now - window_t, 1e-9)
                window_t, window_imgs = now, 0
                metrics = {"z_std": representation_std(self._z).item(), **self.step_module.metrics}
                if self.is_main:
                    self._report(lr, images_per_s, metrics)
                if self._agree(self.is_main and hooks.should_stop()):
                    raise Cancelled(f"cancelled at step {self.global_step} of {self.total_steps}")
        if self.is_main:
            torch.save(self.model.backbone.state_dict(), self.workdir / BACKBONE)
        return {
            "epochs": cfg.epochs,
            "steps": self.global_step,
            "final_loss": self.last_loss,
            "final_z_std": metrics.get("z_std"),
            "images_per_s": images_per_s,
            "checkpoint": str(self.workdir / LAST),
            "backbone": str(self.workdir / BACKBONE),
            "devices": self.world,
            "input_pipeline": self.pipeline,
            **({"bit_pairs": bit_pair_counts(self.model.sampler, self.global_step)} if self.model.quantized else {}),
        }

    def _trace_step(self) -> None:
        """Test aid (``SSQL_TRACE_DIR``): this rank's bit pair and a digest of its parameters."""
        import hashlib
        import json

        h = hashlib.sha256()
        for p in self.model.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        bits = str(self.model.sampler.sample(self.global_step)) if self.model.quantized else None
        assert self._trace is not None
        with open(self._trace, "a") as f:
            f.write(json.dumps({"step": self.global_step, "bits": bits, "params": h.hexdigest()}) + "\n")

    def _report(self, lr: float, images_per_s: float, metrics: dict[str, float]) -> None:
        remaining = self.total_steps - self.global_step
        eta = remaining * self.cfg.batch_size / images_per_s if images_per_s > 0 else None
        self.hooks.on_progress(Progress(
            phase="pretrain", epoch=min(self.epoch + 1, self.cfg.epochs) if self.batch_in_epoch else self.epoch, epochs=self.cfg.epochs, step=self.global_step,
            total_steps=self.total_steps, fraction=self.global_step / self.total_steps, loss=self.last_loss,
            lr=lr, images_per_s=images_per_s, eta_s=eta, metrics=metrics,
        ))


def _trace_file(rank: int) -> Path | None:
    import os

    folder = os.environ.get("SSQL_TRACE_DIR")
    return Path(folder) / f"rank{rank}.jsonl" if folder else None


def resolve_pipeline(requested: str, data: Any, device: torch.device) -> str:
    """``"device"`` or ``"loader"`` (PretrainConfig.input_pipeline; "auto": the device pipeline for
    an in-memory dataset on CUDA)."""
    in_memory = in_memory_images(data) is not None
    if requested == "device" and not in_memory:
        raise ConfigError("input_pipeline", "'device' needs a dataset held in memory (digits, synthetic, fashion_mnist, "
                          "mnist, cifar10, cifar100); image folders use 'loader'")
    if requested == "auto":
        return "device" if in_memory and device.type == "cuda" else "loader"
    return requested


def read_resumable(path: Path, cfg: PretrainConfig, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint this run may resume from, or ConfigError naming the field that differs."""
    state = ckpt.load(path, device)
    saved = PretrainConfig.from_dict(state["config"])
    for key in RESUME_KEYS:
        if getattr(saved, key) != getattr(cfg, key):
            raise ConfigError(key, f"{path} was written with {key}={getattr(saved, key)!r}, this run has {getattr(cfg, key)!r}; use another workdir to start afresh")
    return state


def pretrain(cfg: PretrainConfig, workdir: str | Path, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining job in ``workdir``; see the module docstring."""
    cfg = cfg.validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if cfg.devices > 1:
        from ssql_core.distributed import launch

        if (workdir / LAST).exists():  # a corrupt or foreign checkpoint fails here, with its own traceback
            read_resumable(workdir / LAST, cfg)
        return launch(cfg, workdir, hooks or Hooks(), run_rank)
    return run_rank(cfg, workdir, hooks or Hooks(), 0, 1)


def run_rank(cfg: PretrainConfig, workdir: Path, hooks: Hooks, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """One process's share of a run (all of it when ``world`` is 1): resume from ``last.pt`` if
    there is one, train to the end, return the summary (rank 0's is the run's)."""
    trainer = _Trainer(cfg, workdir, hooks, rank=rank, world=world)
    if (workdir / LAST).exists():
        trainer.restore(workdir / LAST)
    return trainer.run()
