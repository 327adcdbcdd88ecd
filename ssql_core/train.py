"""Self-supervised pretraining loop: deterministic, resumable, observable, cancellable.

``pretrain(cfg, workdir)`` writes ``workdir/last.pt`` (full resumable state) every
``cfg.checkpoint_every_steps`` steps and at each epoch end, and ``workdir/backbone.pt`` (the FP
backbone's state_dict with torchvision's names) at the end. If ``last.pt`` exists when it starts,
it resumes from it exactly: 2 epochs straight and 1 + resume + 1 give identical weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ssql_core import checkpoint as ckpt
from ssql_core.config import PretrainConfig
from ssql_core.data import SeededViews, load_split, pretrain_transform
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.hooks import Hooks, Progress
from ssql_core.losses import representation_std
from ssql_core.methods import Method, build_method
from ssql_core.runtime import autocast, resolve_device, seed_everything, to_input, use_channels_last

LAST, BACKBONE = "last.pt", "backbone.pt"


def cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def build_optimizer(model: Method, cfg: PretrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's shuffled batches (last partial batch dropped), a pure function of its inputs."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    bs = min(batch_size, n)
    return [perm[i * bs:(i + 1) * bs] for i in range(n // bs)]


def load_pretrained(path: str | Path, map_location: str = "cpu") -> tuple[PretrainConfig, Method]:
    """Rebuild a method (backbone + heads) from a pretrain checkpoint."""
    state = ckpt.load(path, map_location)
    if state.get("kind") != "pretrain":
        raise ConfigError("checkpoint", f"{path} is not a pretrain checkpoint (last.pt)")
    cfg = PretrainConfig.from_dict(state["config"])
    model = build_method(cfg)
    model.load_state_dict(state["model"])
    return cfg, model


class _Trainer:
    def __init__(self, cfg: PretrainConfig, workdir: Path, hooks: Hooks) -> None:
        self.cfg, self.workdir, self.hooks = cfg, workdir, hooks
        self.device = resolve_device(cfg.device)
        self.channels_last = use_channels_last(self.device, cfg.channels_last)
        seed_everything(cfg.seed)
        split = load_split(cfg.dataset, True, cfg.image_size, cfg.data_root, cfg.allow_download, cfg.max_samples, cfg.seed)
        self.data = SeededViews(split.data, pretrain_transform(cfg.image_size, split.stats_key), cfg.seed)
        self.n = len(self.data)
        self.steps_per_epoch = len(epoch_batches(self.n, cfg.batch_size, cfg.seed, 0))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.model = build_method(cfg).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = build_optimizer(self.model, cfg)
        self.step_fn = torch.compile(self.model.training_step) if cfg.compile else self.model.training_step
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.last_loss: float | None = None

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
        state = ckpt.load(path, self.device)
        saved = PretrainConfig.from_dict(state["config"])
        for key in ("method", "backbone", "dataset", "width", "image_size", "seed", "batch_size", "epochs", "max_samples"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise ConfigError(key, f"{path} was written with {key}={getattr(saved, key)!r}, this run has {getattr(self.cfg, key)!r}; use another workdir to start afresh")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch, self.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        self.last_loss = state.get("last_loss")
        ckpt.set_rng_state(state["rng"])

    def save(self) -> None:
        path = self.workdir / LAST
        ckpt.save_atomic(self.state(), path)
        self.hooks.on_checkpoint(path, self.epoch, self.global_step)

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, hooks = self.cfg, self.hooks
        self.model.train()
        window_t, window_imgs = time.perf_counter(), 0
        images_per_s: float | None = None
        metrics: dict[str, float] = {}
        while self.epoch < cfg.epochs:
            self.data.set_epoch(self.epoch)
            batches = epoch_batches(self.n, cfg.batch_size, cfg.seed, self.epoch)[self.batch_in_epoch:]
            loader = DataLoader(self.data, batch_sampler=batches, num_workers=cfg.num_workers,
                                pin_memory=self.device.type == "cuda", persistent_workers=False)
            for x1, x2 in loader:
                lr = cosine_lr(cfg.lr, self.global_step, self.total_steps)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                x1 = to_input(x1, self.device, self.channels_last)
                x2 = to_input(x2, self.device, self.channels_last)
                with autocast(self.device, cfg.amp):
                    out = self.step_fn(x1, x2, self.global_step)
                loss = out.loss.float()
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"loss became {loss.item()} at epoch {self.epoch + 1}, step {self.global_step}: "
                        f"lower the learning rate (lr={cfg.lr}) or check the input data"
                    )
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.model.after_optimizer_step(self.global_step, self.total_steps)
                self.global_step += 1
                self.batch_in_epoch += 1
                window_imgs += len(x1)
                self.last_loss = loss.item()
                epoch_end = self.batch_in_epoch == self.steps_per_epoch
                if epoch_end:
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if epoch_end or self.global_step % cfg.checkpoint_every_steps == 0:
                    self.save()
                if epoch_end or self.global_step % hooks.every_n_steps == 0:
                    now = time.perf_counter()
                    images_per_s = window_imgs / max(now - window_t, 1e-9)
                    window_t, window_imgs = now, 0
                    metrics = {"z_std": representation_std(out.z).item(), **out.metrics}
                    self._report(lr, images_per_s, metrics)
                    if hooks.should_stop():
                        raise Cancelled(f"cancelled at step {self.global_step} of {self.total_steps}")
        torch.save(self.model.backbone.state_dict(), self.workdir / BACKBONE)
        return {
            "epochs": cfg.epochs,
            "steps": self.global_step,
            "final_loss": self.last_loss,
            "final_z_std": metrics.get("z_std"),
            "images_per_s": images_per_s,
            "checkpoint": str(self.workdir / LAST),
            "backbone": str(self.workdir / BACKBONE),
        }

    def _report(self, lr: float, images_per_s: float, metrics: dict[str, float]) -> None:
        remaining = self.total_steps - self.global_step
        eta = remaining * self.cfg.batch_size / images_per_s if images_per_s > 0 else None
        self.hooks.on_progress(Progress(
            phase="pretrain", epoch=min(self.epoch + 1, self.cfg.epochs) if self.batch_in_epoch else self.epoch, epochs=self.cfg.epochs, step=self.global_step,
            total_steps=self.total_steps, fraction=self.global_step / self.total_steps, loss=self.last_loss,
            lr=lr, images_per_s=images_per_s, eta_s=eta, metrics=metrics,
        ))


def pretrain(cfg: PretrainConfig, workdir: str | Path, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining job in ``workdir``; see the module docstring."""
    cfg = cfg.validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    trainer = _Trainer(cfg, workdir, hooks or Hooks())
    if (workdir / LAST).exists():
        trainer.restore(workdir / LAST)
    return trainer.run()
