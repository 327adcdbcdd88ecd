"""Supervised quantization-aware fine-tuning of a pretrained backbone at one bit-width (SPEC 6, "other
protocols"): the most common downstream use, and the paper's transfer results.

``finetune(cfg, workdir)``: the pretrain checkpoint's backbone plus a new linear head for the
target dataset (which may differ from the pretraining one: transfer; its number of classes is
taken from it), trained end to end with labels at ``cfg.bits`` with one of the project's quantizer
families (``psq`` default; ``fp`` trains without quantization). Activation ranges are calibrated
first on ``calib_images`` training images, then kept fixed (``act_ranges="frozen"``, the SPEC's
protocol) or updated during training (``"update"``: PSQ's running min-max, or the learnable
quantizers' own range parameters trained at ``quantizer_lr``). The stem and the head keep the
evaluation protocol's layout (stem 8-bit, pooled feature and head FP).

Defaults follow the reference code's fine-tuning config (CIFAR): SGD momentum 0.9, lr 0.01,
weight decay 1e-4, batch 128, 50 epochs with lr x0.1 at 60 % and 80 %, RandomResizedCrop(0.08-1)
+ flip, 1000 calibration images; the rest is recorded in docs/decisions/013.

Deterministic and resumable mid-run: ``workdir/finetune_last.pt`` holds the full state (weights,
BN statistics, quantizer state, optimizer, position, RNG) every ``checkpoint_every_steps`` and at
each epoch end; a run restarted in the same workdir continues exactly. Writes
``workdir/finetuned.pt`` (the student format of :mod:`ssql_core.distill.student`, so the packed
export path is shared) at the end.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ssql_core import checkpoint as ckpt
from ssql_core.bits import BitWidth, parse_bits
from ssql_core.calibration import calibrate_ranges
from ssql_core.config import (
    MAX_BATCH,
    MAX_EPOCHS,
    EvalConfig,
    _check_finite_list,
    _check_range,
    _from_dict,
    check_milestones,
)
from ssql_core.data import (
    SeededViews,
    Transformed,
    _finish,
    load_split,
    stats_key_for,
    test_transform,
)
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.evaluate import (
    accuracy,
    calibration_images,
    extract,
    materialize,
    train_linear_cached,
)
from ssql_core.hooks import Hooks, Progress
from ssql_core.qnn import QuantContext, bind_context
from ssql_core.quantizers import QUANTIZER_NAMES
from ssql_core.quantizers.attach import QATAct, attach, init_quantizers
from ssql_core.quantizers.psq import PSQAct
from ssql_core.runtime import resolve_device, seed_everything, to_input
from ssql_core.train import epoch_batches, load_pretrained

LAST, FINETUNED = "finetune_last.pt", "finetuned.pt"
HEAD_INITS = ("probe", "random")
ACT_RANGES = ("frozen", "update")


@dataclass
class FinetuneConfig:
    """One fine-tuning run: ``checkpoint`` (a pretrain ``last.pt``) at ``bits`` on ``dataset``."""

    checkpoint: str = ""
    dataset: str | None = None  # default: the pretrain run's dataset; another one = transfer
    bits: str = "4w4a"  # "fp" allowed
    quantizer: str = "psq"
    act_ranges: str = "frozen"
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.01
    #: the new head's lr (default: ``lr``)
    head_lr: float | None = None
    #: "probe" (default): the head starts as the PTQ + linear probe trained for the baseline
    #: (linear probing, then fine-tuning: a random head's first gradients distort the pretrained
    #: features, docs/decisions/017); "random": a freshly initialised head (the reference code)
    head_init: str = "probe"
    quantizer_lr: float = 1e-5
    weight_decay: float = 1e-4
    momentum: float = 0.9
    lr_milestones: tuple[float, float] = (0.6, 0.8)
    #: RandomResizedCrop's scale range of the training augmentation (then a horizontal flip)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    calib_images: int = 1000
    #: the PTQ + linear starting point reported beside the result (0 = skip): probe epochs
    baseline_epochs: int = 30
    #: test top-1 in the per-epoch curve every this many epochs (and always after the last)
    test_every_epochs: int = 1
    ewgs_delta: float = 1e-3
    max_samples: int | None = None
    seed: int = 0
    checkpoint_every_steps: int = 200
    data_root: str | None = None
    allow_download: bool = False
    device: str = "auto"
    num_workers: int = 0

    def validate(self) -> FinetuneConfig:
        from ssql_core.data import check_dataset_name

        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ConfigError("checkpoint", "give the path of a pretrain checkpoint (last.pt)")
        try:
            parse_bits(self.bits)
        except (ValueError, TypeError) as e:
            raise ConfigError("bits", str(e)) from None
        if self.quantizer not in QUANTIZER_NAMES:
            raise ConfigError("quantizer", f"unknown quantizer {self.quantizer!r}; known: {list(QUANTIZER_NAMES)}")
        if self.act_ranges not in ACT_RANGES:
            raise ConfigError("act_ranges", f"must be one of {list(ACT_RANGES)}, got {self.act_ranges!r}")
        if self.dataset is not None:
            check_dataset_name(self.dataset, self.data_root, self.allow_download)
        _check_range("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_range("batch_size", self.batch_size, 2, MAX_BATCH)
        _check_range("lr", self.lr, 1e-8, 10.0, float)
        if self.head_lr is not None:
            _check_range("head_lr", self.head_lr, 1e-8, 100.0, float)
        _check_range("quantizer_lr", self.quantizer_lr, 0.0, 10.0, float)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0, float)
        _check_range("momentum", self.momentum, 0.0, 0.9999, float)
        check_milestones("lr_milestones", self.lr_milestones)
        _check_finite_list("crop_scale", self.crop_scale, 0.01, 1.0, 2)
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ConfigError("crop_scale", f"needs low <= high, got {list(self.crop_scale)}")
        _check_range("calib_images", self.calib_images, 1, 10**6)
        _check_range("baseline_epochs", self.baseline_epochs, 0, 1000)
        if self.head_init not in HEAD_INITS:
            raise ConfigError("head_init", f"must be one of {list(HEAD_INITS)}, got {self.head_init!r}")
        if self.head_init == "probe" and self.baseline_epochs == 0:
            raise ConfigError("head_init", "'probe' starts the head from the PTQ + linear baseline: give baseline_epochs >= 1, "
                              "or head_init 'random'")
        _check_range("test_every_epochs", self.test_every_epochs, 1, MAX_EPOCHS)
        _check_range("ewgs_delta", self.ewgs_delta, 0.0, 10.0, float)
        if self.max_samples is not None:
            _check_range("max_samples", self.max_samples, 2, 10**9)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("checkpoint_every_steps", self.checkpoint_every_steps, 1, 10**9)
        _check_range("num_workers", self.num_workers, 0, 64)
        if not isinstance(self.allow_download, bool):
            raise ConfigError("allow_download", "must be true or false")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lr_milestones"], d["crop_scale"] = list(self.lr_milestones), list(self.crop_scale)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        obj = _from_dict(cls, d)
        for name in ("lr_milestones", "crop_scale"):
            if isinstance(getattr(obj, name), list):
                setattr(obj, name, tuple(getattr(obj, name)))
        return obj


class FinetuneModel(nn.Module):
    """Backbone (quantized at ``bits`` with ``family`` unless FP) + FP linear head -> logits.

    The attribute names match :class:`ssql_core.distill.student.Student`, so the student file
    format and its packed export apply unchanged."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, family: str, bits: BitWidth, options: dict[str, Any]) -> None:
        super().__init__()
        self.bits, self.family = bits, family
        self.backbone, self.head = backbone, head
        self.quantizers = nn.ModuleDict() if bits.is_fp else attach(backbone, family, bits, options)
        self.ctx: QuantContext = bind_context(backbone, QuantContext())

    def forward(self, x: Tensor) -> Tensor:
        with self.ctx.quantized(self.bits):
            return self.head(self.backbone(x))

    def deploy_grids(self) -> dict[str, dict[str, Any]]:
        from ssql_core.distill.student import Student

        return Student.deploy_grids(self)  # type: ignore[arg-type]

    def act_quantizers(self) -> list[nn.Module]:
        return [m._qat.quantizer for m in self.backbone.modules() if isinstance(m, QATAct) and m._qat is not None]


def _lr_factor(cfg: FinetuneConfig, epoch: int) -> float:
    return 0.1 ** sum(epoch >= int(m * cfg.epochs) for m in cfg.lr_milestones)


def train_transform(image_size: int, stats_key: str, scale: tuple[float, float]) -> v2.Compose:
    return v2.Compose([v2.RandomResizedCrop(image_size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
                       *_finish(stats_key)])


class _Finetuner:
    def __init__(self, cfg: FinetuneConfig, workdir: Path, hooks: Hooks) -> None:
        self.cfg, self.workdir, self.hooks = cfg, workdir, hooks
        self.device = resolve_device(cfg.device)
        self.bits = parse_bits(cfg.bits)
        seed_everything(cfg.seed)
        if not Path(cfg.checkpoint).is_file():
            raise ConfigError("checkpoint", f"file {cfg.checkpoint} does not exist")
        self.pcfg, method = load_pretrained(cfg.checkpoint)
        self.dataset = cfg.dataset or self.pcfg.dataset
        size = self.pcfg.image_size
        train = load_split(self.dataset, True, size, cfg.data_root, cfg.allow_download, cfg.max_samples, cfg.seed)
        test = load_split(self.dataset, False, size, cfg.data_root, cfg.allow_download, None, cfg.seed)
        self.num_classes = train.num_classes
        stats_key = stats_key_for(train.stats_key, self.pcfg.normalization)  # as the backbone was trained
        ttf = test_transform(size, stats_key)
        self.train_plain = materialize(Transformed(train.data, ttf))
        self.test_plain = materialize(Transformed(test.data, ttf))
        self.train_aug = SeededViews(train.data, train_transform(size, stats_key, tuple(cfg.crop_scale)), cfg.seed,
                                     n_views=1, with_label=True)
        self.n_train, self.n_test = len(train.data), len(test.data)
        self.calib = [to_input(x, self.device, False) for x, _ in calibration_images(self.train_plain, cfg.calib_images, cfg.seed)]
        self.backbone = method.backbone.to(self.device)
        self.model: FinetuneModel | None = None
        self.steps_per_epoch = len(epoch_batches(self.n_train, cfg.batch_size, cfg.seed, 0))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.curve: list[dict[str, Any]] = []
        self.result: dict[str, Any] = {}
        self.probe_head: nn.Linear | None = None
        self.last_loss: float | None = None

    def build_model(self) -> FinetuneModel:
        """The backbone with the quantizers attached and a head: the baseline's probe
        (``head_init="probe"``) or a new seeded one."""
        torch.manual_seed(self.cfg.seed)
        head = nn.Linear(int(self.backbone.feat_dim), self.num_classes).to(self.device)
        if self.cfg.head_init == "probe" and self.probe_head is not None:
            head.load_state_dict(self.probe_head.state_dict())
        model = FinetuneModel(self.backbone, head, self.cfg.quantizer, self.bits, {"delta": self.cfg.ewgs_delta}).to(self.device)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    # -- the starting point ---------------------------------------------------------------
    @torch.no_grad()
    def ptq_linear_baseline(self) -> dict[str, Any]:
        """PTQ of the pretrained backbone at ``bits`` (PSQ min-max on the calibration images) with a
        converged linear probe (BN + linear, lr 0.1) on its frozen features: the start to beat.
        Runs before the fine-tuning quantizers are attached."""
        if self.cfg.baseline_epochs == 0:
            return {}
        bb = self.backbone
        ctx = bind_context(bb, QuantContext(rounding=self.pcfg.rounding))
        was = bb.training
        bb.eval()
        calibrate_ranges(bb, ctx, [(x, None) for x in self.calib], self.device, self.bits, "minmax")
        loader = lambda ds: DataLoader(ds, batch_size=512)  # noqa: E731
        with ctx.quantized(self.bits):
            tr_f, tr_y = extract(bb, loader(self.train_plain), self.device)
            te_f, te_y = extract(bb, loader(self.test_plain), self.device)
        ecfg = EvalConfig(checkpoint="-", probe="bn", lr=0.1, epochs=self.cfg.baseline_epochs, seed=self.cfg.seed, batch_size=256)
        with torch.enable_grad():
            head = train_linear_cached(tr_f, tr_y, self.num_classes, ecfg, lambda e, loss: None)
        bb.train(was)
        self.probe_head = head
        return {"ptq_linear_top1": round(accuracy(head, te_f, te_y), 3), "ptq_linear_probe": "bn, lr 0.1",
                "ptq_linear_epochs": self.cfg.baseline_epochs}

    def calibrate(self) -> int:
        """Initialise every quantizer from the calibration images (FP forward, eval-mode BN)."""
        if self.bits.is_fp:
            return 0
        n = init_quantizers(self.model.backbone, self.calib)
        if self.cfg.act_ranges == "frozen":
            self.freeze_act_ranges()
        return n

    def freeze_act_ranges(self) -> None:
        for q in self.model.act_quantizers():
            if isinstance(q, PSQAct):
                q.momentum = 0.0
            for p in q.parameters():
                p.requires_grad_(False)

    def optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        head = list(self.model.head.parameters())
        qparams = [p for p in self.model.quantizers.parameters() if p.requires_grad]
        weights = [p for p in self.model.backbone.parameters() if p.requires_grad]
        groups = [{"params": weights, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay},
                  {"params": head, "lr": cfg.head_lr or cfg.lr, "base_lr": cfg.head_lr or cfg.lr, "weight_decay": cfg.weight_decay}]
        if qparams:
            groups.append({"params": qparams, "lr": cfg.quantizer_lr, "base_lr": cfg.quantizer_lr, "weight_decay": 0.0})
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)

    # -- state -----------------------------------------------------------------------------
    def state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return {"kind": "finetune", "format_version": ckpt.FORMAT_VERSION, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": opt.state_dict(), "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step, "rng": ckpt.rng_state(),
                "curve": self.curve, "result": self.result, "last_loss": self.last_loss,
                "frozen": self.cfg.act_ranges == "frozen"}

    def restore(self, path: Path, opt: torch.optim.Optimizer) -> None:
        state = ckpt.load(path, self.device)
        if state.get("kind") != "finetune":
            raise ConfigError("checkpoint", f"{path} is not a fine-tuning checkpoint")
        saved = FinetuneConfig.from_dict(state["config"])
        for key in ("checkpoint", "dataset", "bits", "quantizer", "act_ranges", "epochs", "batch_size", "seed", "max_samples"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise ConfigError(key, f"{path} was written with {key}={getattr(saved, key)!r}, this run has "
                                  f"{getattr(self.cfg, key)!r}; use another workdir to start afresh")
        self.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        self.epoch, self.batch_in_epoch, self.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        self.curve, self.result, self.last_loss = state["curve"], state["result"], state.get("last_loss")
        ckpt.set_rng_state(state["rng"])

    def save(self, opt: torch.optim.Optimizer) -> None:
        path = self.workdir / LAST
        ckpt.save_atomic(self.state(opt), path)
        self.hooks.on_checkpoint(path, self.epoch, self.global_step)

    # -- evaluation and training ------------------------------------------------------------
    @torch.no_grad()
    def test_top1(self) -> float:
        was = self.model.training
        self.model.eval()
        correct = 0
        for x, y in DataLoader(self.test_plain, batch_size=512):
            correct += (self.model(to_input(x, self.device, False)).argmax(1).cpu() == torch.as_tensor(y)).sum().item()
        self.model.train(was)
        return round(100.0 * correct / max(self.n_test, 1), 3)

    def run(self) -> dict[str, Any]:
        cfg, hooks = self.cfg, self.hooks
        last = self.workdir / LAST
        if last.exists():
            # quantizers exist before restoring (their state is part of the model's state_dict)
            self.model = self.build_model()
            if cfg.act_ranges == "frozen" and not self.bits.is_fp:
                self.freeze_act_ranges()
            opt = self.optimizer()
            self.restore(last, opt)
        else:
            self.result = {**self.ptq_linear_baseline()}
            self.model = self.build_model()
            self.result["calib_images"] = self.calibrate()
            self.result["start_top1"] = self.test_top1()  # quantized backbone + the starting head
            self.result["head_init"] = cfg.head_init
            opt = self.optimizer()
        self.model.train()
        t0, seen = time.perf_counter(), 0
        while self.epoch < cfg.epochs:
            self.train_aug.set_epoch(self.epoch)
            factor = _lr_factor(cfg, self.epoch)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            batches = epoch_batches(self.n_train, cfg.batch_size, cfg.seed, self.epoch)[self.batch_in_epoch:]
            loader = DataLoader(self.train_aug, batch_sampler=batches, num_workers=cfg.num_workers)
            total_loss, n_batches = 0.0, 0
            for x, y in loader:
                x = to_input(x, self.device, False)
                loss = F.cross_entropy(self.model(x).float(), torch.as_tensor(y, device=self.device))
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"fine-tuning loss became {loss.item()} at epoch {self.epoch + 1}, step "
                                        f"{self.global_step}: lower the learning rate (lr={cfg.lr})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.global_step += 1
                self.batch_in_epoch += 1
                seen += len(x)
                self.last_loss = loss.item()
                total_loss, n_batches = total_loss + self.last_loss, n_batches + 1
                epoch_end = self.batch_in_epoch == self.steps_per_epoch
                metrics: dict[str, float] = {}
                if epoch_end:
                    done = self.epoch + 1
                    top1 = self.test_top1() if done % cfg.test_every_epochs == 0 or done == cfg.epochs else None
                    self.curve.append({"epoch": done, "train_loss": round(total_loss / max(n_batches, 1), 5), "test_top1": top1})
                    metrics = {} if top1 is None else {"test_top1": top1}
                    self.epoch += 1
                    self.batch_in_epoch = 0
                if epoch_end or self.global_step % cfg.checkpoint_every_steps == 0:
                    self.save(opt)
                if epoch_end or self.global_step % hooks.every_n_steps == 0:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    hooks.on_progress(Progress(
                        phase="finetune", epoch=min(self.epoch + 1, cfg.epochs) if self.batch_in_epoch else self.epoch,
                        epochs=cfg.epochs, step=self.global_step, total_steps=self.total_steps,
                        fraction=self.global_step / self.total_steps, loss=self.last_loss, lr=opt.param_groups[0]["lr"],
                        images_per_s=rate, eta_s=(self.total_steps - self.global_step) * cfg.batch_size / rate if rate > 0 else None,
                        metrics=metrics,
                    ))
                    if hooks.should_stop():
                        raise Cancelled(f"cancelled at step {self.global_step} of {self.total_steps}")
        top1 = self.curve[-1]["test_top1"] if self.curve and self.curve[-1]["test_top1"] is not None else self.test_top1()
        self.result.update({
            "bits": str(self.bits), "quantizer": cfg.quantizer if not self.bits.is_fp else None, "act_ranges": cfg.act_ranges,
            "dataset": self.dataset, "pretrain_dataset": self.pcfg.dataset, "top1": top1, "epochs": cfg.epochs,
            "steps": self.global_step, "final_loss": self.last_loss, "train_images": self.n_train, "test_images": self.n_test,
            "num_classes": self.num_classes, "curve": self.curve, "protocol": "finetune",
        })
        if "ptq_linear_top1" in self.result:
            self.result["gain_over_ptq_linear"] = round(top1 - self.result["ptq_linear_top1"], 3)
        self.save_final()
        return self.result

    def save_final(self) -> None:
        """``finetuned.pt`` in the distilled-student layout, so the packed export is shared."""
        from ssql_core.distill.student import save_student

        fp = self.bits.is_fp
        save_student(self.model, self.workdir / FINETUNED, {  # type: ignore[arg-type]
            **({"quantizer": None, "deploy": {}} if fp else {}),
            "config": self.cfg.to_dict(), "pretrain_config": self.pcfg.to_dict(), "num_classes": self.num_classes,
            "result": self.result, "trained_by": "finetune",
        })


def finetune(cfg: FinetuneConfig, workdir: str | Path, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run (or resume) a fine-tuning job in ``workdir``; see the module docstring. Returns the result."""
    cfg = cfg.validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return _Finetuner(cfg, workdir, hooks or Hooks()).run()


def export_finetuned(path: str | Path, out_path: str | Path, fmt: str = "safetensors") -> Path:
    """The fine-tuned classifier (``finetuned.pt``) as a packed checkpoint (``fmt="safetensors"``)
    or an ONNX QDQ graph (``"onnx"``) at its bits (psq/lsq; FP weights for ``fp``);
    ``ValueError`` for a quantizer without a packed form."""
    from ssql_core.distill.export import student_to_quantized
    from ssql_core.export.format import write_quantized
    from ssql_core.export.quantized import QuantizedBackbone

    state, model = load_finetuned(path)
    if model.bits.is_fp:
        q = QuantizedBackbone(arch={"name": state["arch"]["name"], "stem": state["arch"]["stem"], "width": float(state["arch"]["width"])},
                              bits=model.bits, fp={k: v.float() if v.is_floating_point() else v for k, v in state["backbone"].items()})
    else:
        q = student_to_quantized(model)
    head = {k: v.detach().float().cpu() for k, v in model.head.state_dict().items()}
    info = {"source": {"kind": "finetuned", "checkpoint": Path(path).name, "quantizer": state.get("quantizer"),
                       "finetune_config": state.get("config"), "pretrain_config": state.get("pretrain_config")},
            "evaluation": {"result": {k: v for k, v in (state.get("result") or {}).items() if k != "curve"}}}
    if fmt == "onnx":
        from ssql_core.export.onnx_graph import write_onnx

        return write_onnx(out_path, q, head, info)
    if fmt != "safetensors":
        raise ValueError(f"a fine-tuned classifier exports as safetensors or onnx, not {fmt!r}")
    return write_quantized(out_path, q, head, info)


def load_finetuned(path: str | Path) -> tuple[dict[str, Any], FinetuneModel]:
    """Rebuild a ``finetuned.pt`` (eval mode) with its saved record."""
    from ssql_core.models import build_backbone

    state = ckpt.load(path)
    if state.get("trained_by") != "finetune":
        raise ConfigError("checkpoint", f"{path} is not a fine-tuned classifier ({FINETUNED})")
    arch = state["arch"]
    backbone = build_backbone(arch["name"], arch["stem"], arch["width"])
    w = state["head"]["weight"]
    head = nn.Linear(w.shape[1], w.shape[0])
    model = FinetuneModel(backbone, head, state["quantizer"] or "psq", parse_bits(state["bits"]), {"delta": state["config"]["ewgs_delta"]})
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    model.quantizers.load_state_dict(state["quantizers"])
    return state, model.eval()
