"""SQAKD (SPEC 8): distil a frozen FP teacher into a quantized student without labels.

``distill(cfg, workdir)``: teacher = the pretrain checkpoint's backbone + the ``fp`` head of an
evaluation's ``heads.pt``, frozen, eval mode. Student = a copy at ``cfg.bits`` with the chosen
quantizer, quantizers initialised from calibration images. Loss ``T^2 KL(teacher || student)``
(T = 4) on training images read through :mod:`ssql_core.distill.data`, which never reads a label
(``ce_weight > 0`` adds cross-entropy and then, only then, labels are read). Adam (weights
``lr``, quantizer parameters ``quantizer_lr``), cosine schedule per step. Reports the student's
test top-1, and the PTQ baseline at the same bits (PSQ min-max, same calibration images, the same
FP head) for comparison; writes ``workdir/student.pt``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ssql_core import checkpoint as ckpt
from ssql_core.bits import parse_bits
from ssql_core.data import (
    Transformed,
    linear_train_transform,
    load_split,
    stats_key_for,
    test_transform,
)
from ssql_core.distill.config import DistillConfig
from ssql_core.distill.data import ImagesOnly, num_images
from ssql_core.distill.student import STUDENT, Student, save_student, student_from_teacher
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.evaluate import calibration_images
from ssql_core.hooks import Hooks, Progress
from ssql_core.losses import distill_kl
from ssql_core.qnn import bind_context
from ssql_core.quantizers.attach import init_quantizers
from ssql_core.runtime import resolve_device, seed_everything, to_input
from ssql_core.train import cosine_lr, epoch_batches, load_pretrained


def load_teacher(cfg: DistillConfig) -> tuple[Any, nn.Module, nn.Linear, dict[str, Any]]:
    """(pretrain config, frozen FP backbone, frozen FP head, heads record) of a distillation job."""
    for name in ("checkpoint", "heads"):
        if not Path(getattr(cfg, name)).is_file():
            raise ConfigError(name, f"file {getattr(cfg, name)} does not exist")
    pcfg, method = load_pretrained(cfg.checkpoint)
    backbone = method.backbone.eval()
    record = ckpt.load(cfg.heads)
    if record.get("kind") != "linear_heads":
        raise ConfigError("heads", f"{cfg.heads} is not an evaluation heads file (heads.pt)")
    if record.get("pretrain_config") not in (None, pcfg.to_dict()):
        raise ConfigError("heads", f"{cfg.heads} was trained on another pretrain run's backbone than {cfg.checkpoint}")
    if "fp" not in record["heads"]:
        raise ConfigError("heads", f"{cfg.heads} has no 'fp' head (evaluate with 'fp' among the bits); has {sorted(record['heads'])}")
    w = record["heads"]["fp"]["weight"]
    if w.shape[1] != backbone.feat_dim:
        raise ConfigError("heads", f"head expects {w.shape[1]} features, the checkpoint's backbone gives {backbone.feat_dim}")
    head = nn.Linear(w.shape[1], w.shape[0])
    head.load_state_dict(record["heads"]["fp"])
    for p in [*backbone.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    return pcfg, backbone, head.eval(), record


def _image_loader(ds: Any, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _logits_and_labels(fn: Any, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    outs, labels = [], []
    for x, y in loader:
        outs.append(fn(to_input(x, device, False)).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(outs), torch.cat(labels).to(device)


def _top1(logits: Tensor, y: Tensor) -> float:
    return round(100.0 * (logits.argmax(1) == y).float().mean().item(), 3)


def _kl(student_logits: Tensor, teacher_logits: Tensor, t: float) -> float:
    return round(distill_kl(student_logits, teacher_logits, t).item(), 5)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(student: Student, images: list[Tensor]) -> None:
    """Re-estimate BN running statistics of the *quantized* student on ``images`` (label-free):
    quantized activations have other statistics than the FP ones the teacher's BN saw."""
    bns = _batchnorms(student)
    saved = [(m.momentum, m.training) for m in bns]
    was_training = student.training
    student.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    try:
        for x in images:
            student(x)
    finally:
        for m, (mom, tr) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.train(tr)
        student.train(was_training)


class _Distiller:
    def __init__(self, cfg: DistillConfig, workdir: Path, hooks: Hooks) -> None:
        self.cfg, self.workdir, self.hooks = cfg, workdir, hooks
        self.device = resolve_device(cfg.device)
        self.bits = parse_bits(cfg.bits)
        seed_everything(cfg.seed)
        self.pcfg, teacher_bb, self.teacher_head, self.heads_record = load_teacher(cfg)
        self.teacher_bb = teacher_bb.to(self.device)
        self.teacher_head = self.teacher_head.to(self.device)
        dataset = cfg.dataset or self.pcfg.dataset
        size = self.pcfg.image_size
        train = load_split(dataset, True, size, cfg.data_root, cfg.allow_download, cfg.max_samples, cfg.seed)
        test = load_split(dataset, False, size, cfg.data_root, cfg.allow_download, None, cfg.seed)
        self.num_classes = train.num_classes
        if self.num_classes != self.teacher_head.out_features:
            raise ConfigError("dataset", f"{dataset} has {self.num_classes} classes, the teacher's head {self.teacher_head.out_features}")
        stats_key = stats_key_for(train.stats_key, self.pcfg.normalization)  # as the teacher was trained
        ttf = test_transform(size, stats_key)
        train_tf = linear_train_transform(size, stats_key) if cfg.augment else ttf
        # the training stream: images only (labels only when the user asked for a CE term)
        self.train_images = ImagesOnly(train.data, train_tf, cfg.seed)
        self.train_labelled = Transformed(train.data, train_tf) if cfg.labels_used else None
        plain = ImagesOnly(train.data, ttf, cfg.seed)
        # the evaluation protocol's calibration set, so PTQ here matches the eval job's PTQ
        self.calib = [to_input(x, self.device, False) for x in calibration_images(plain, cfg.calib_images, cfg.seed)]
        self.test_loader = _image_loader(Transformed(test.data, ttf), 512)
        self.n_train, self.n_test = num_images(train.data), num_images(test.data)

    # -- baselines -------------------------------------------------------------------------
    def teacher_logits(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_bb(x))

    @torch.no_grad()
    def ptq_baseline(self, teacher_test: Tensor, y: Tensor) -> dict[str, Any]:
        """PSQ PTQ of the teacher at the student's bits, calibrated on the same images."""
        ctx = bind_context(self.teacher_bb)
        with ctx.recording():
            for x in self.calib:
                self.teacher_bb(x)
        with ctx.quantized(self.bits):
            feats, _ = _logits_and_labels(self.teacher_bb, self.test_loader, self.device)
        logits = self.teacher_head(feats)
        out = {"ptq_top1": _top1(logits, y), "ptq_kl": _kl(logits, teacher_test, self.cfg.temperature)}
        own = self.heads_record["heads"].get(str(self.bits))
        if own is not None:  # evaluate's linear head trained (with labels) on these PTQ features
            head = nn.Linear(feats.shape[1], own["weight"].shape[0]).to(self.device)
            head.load_state_dict(own)
            out["ptq_linear_top1"] = _top1(head(feats), y)
        return out

    # -- training --------------------------------------------------------------------------
    def build_student(self) -> Student:
        cfg = self.cfg
        student = student_from_teacher(self.teacher_bb, self.teacher_head, cfg.quantizer, self.bits,
                                       {"delta": cfg.ewgs_delta}).to(self.device)
        init_quantizers(student.backbone, self.calib)
        return student

    def train(self, student: Student) -> dict[str, Any]:
        cfg, hooks = self.cfg, self.hooks
        opt = torch.optim.Adam([
            {"params": student.weight_parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": student.quantizer_parameters(), "lr": cfg.quantizer_lr, "weight_decay": 0.0, "base_lr": cfg.quantizer_lr},
        ])
        steps_per_epoch = len(epoch_batches(self.n_train, cfg.batch_size, cfg.seed, 0))
        total = steps_per_epoch * cfg.epochs
        step, last_loss, t0, seen = 0, None, time.perf_counter(), 0
        for epoch in range(cfg.epochs):
            if cfg.quantizer == "ewgs" and cfg.ewgs_hessian:
                from ssql_core.quantizers.hessian import update_ewgs_deltas

                update_ewgs_deltas(student, self._kl_loss, self.calib)
            if cfg.bn == "recalibrate":
                recalibrate_bn(student, self.calib)
            student.train()
            if cfg.bn != "train":
                for m in _batchnorms(student):
                    m.eval()
            source = self.train_labelled if cfg.labels_used else self.train_images
            if isinstance(source, ImagesOnly):
                source.set_epoch(epoch)
            loader = DataLoader(source, batch_sampler=epoch_batches(self.n_train, cfg.batch_size, cfg.seed, epoch),
                                num_workers=cfg.num_workers)
            for batch in loader:
                x, y = (batch, None) if not cfg.labels_used else batch
                x = to_input(x, self.device, False)
                for g in opt.param_groups:
                    g["lr"] = cosine_lr(g["base_lr"], step, total)
                logits = student(x)
                loss = self._kl_loss(logits, x)
                if y is not None:
                    loss = loss + cfg.ce_weight * F.cross_entropy(logits.float(), torch.as_tensor(y, device=self.device))
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"distillation loss became {loss.item()} at step {step}: lower lr (lr={cfg.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                seen += len(x)
                last_loss = loss.item()
                end = step % steps_per_epoch == 0
                if end or step % hooks.every_n_steps == 0:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    hooks.on_progress(Progress(
                        phase="distill", epoch=epoch + 1, epochs=cfg.epochs, step=step, total_steps=total,
                        fraction=step / total, loss=last_loss, lr=opt.param_groups[0]["lr"], images_per_s=rate,
                        eta_s=(total - step) * cfg.batch_size / rate if rate > 0 else None, metrics={},
                    ))
                    if hooks.should_stop():
                        raise Cancelled(f"cancelled at step {step} of {total}")
        return {"epochs": cfg.epochs, "steps": step, "final_loss": last_loss,
                "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}

    def _kl_loss(self, student_logits: Tensor, x: Tensor) -> Tensor:
        with torch.no_grad():
            teacher = self.teacher_logits(x)
        return distill_kl(student_logits, teacher, self.cfg.temperature)

    @torch.no_grad()
    def test(self, student: Student, teacher_test: Tensor, y: Tensor) -> dict[str, Any]:
        student.eval()
        logits, _ = _logits_and_labels(student, self.test_loader, self.device)
        return {"top1": _top1(logits, y), "kl": _kl(logits, teacher_test, self.cfg.temperature)}

    def start(self) -> tuple[dict[str, Any], Student, Tensor, Tensor]:
        """Baselines and the initialised student: (result so far, student, teacher test logits, labels)."""
        cfg = self.cfg
        teacher_test, y = _logits_and_labels(self.teacher_logits, self.test_loader, self.device)
        result: dict[str, Any] = {
            "bits": str(self.bits), "quantizer": cfg.quantizer, "dataset": cfg.dataset or self.pcfg.dataset,
            "teacher_top1": _top1(teacher_test, y), **self.ptq_baseline(teacher_test, y),
        }
        student = self.build_student()
        start = self.test(student, teacher_test, y)
        result.update({"student_top1_start": start["top1"], "kl_start": start["kl"]})
        if cfg.bn == "recalibrate":  # what BN re-estimation alone gives, before any training
            recalibrate_bn(student, self.calib)
            result["bn_recalibrated_top1"] = self.test(student, teacher_test, y)["top1"]
        return result, student, teacher_test, y

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        result, student, teacher_test, y = self.start()
        result.update(self.train(student))
        end = self.test(student, teacher_test, y)
        result.update({
            "top1": end["top1"], "kl_end": end["kl"], "gain_over_ptq": round(end["top1"] - result["ptq_top1"], 3),
            "labels_used": cfg.labels_used, "calib_images": sum(len(x) for x in self.calib),
            "train_images": self.n_train, "test_images": self.n_test, "temperature": cfg.temperature,
            "student": str(self.workdir / STUDENT),
        })
        save_student(student, self.workdir / STUDENT, {
            "config": cfg.to_dict(), "pretrain_config": self.pcfg.to_dict(),
            "num_classes": self.num_classes, "result": result,
        })
        return result


def distill_baselines(cfg: DistillConfig) -> dict[str, Any]:
    """What a job starts from, without training: teacher, PTQ and (``bn="recalibrate"``) BN
    re-estimation top-1, and the initial student's top-1 and KL. Writes nothing."""
    cfg = cfg.validate()
    return _Distiller(cfg, Path("."), Hooks()).start()[0]


def distill(cfg: DistillConfig, workdir: str | Path, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run one SQAKD job into ``workdir``; see the module docstring. Returns the result row."""
    cfg = cfg.validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return _Distiller(cfg, workdir, hooks or Hooks()).run()
