"""Evaluation at each bit-width (SPEC 6): PTQ of the frozen backbone, then linear or kNN.

For every bit-width: weights per-channel min-max at ``w`` bits (stem at 8), activation ranges
calibrated by FP forward passes over ``calib_images`` training images (test transform, fixed
seeded choice), features = the quantized last block output average-pooled in FP. Then:

* ``protocol="linear", path="augmented"``: the paper's protocol, an FP linear classifier trained
  on augmented images (RandomResizedCrop 0.8-1 + flip) through the frozen quantized backbone;
* ``protocol="linear", path="cached"``: the same classifier schedule on features of the
  un-augmented training images computed once per bit-width (fast, no augmentation);
* ``protocol="knn"``: weighted kNN (k, T, cosine) on the same cached features.

Activation ranges come from ``calibration`` (:mod:`ssql_core.calibration`: minmax, the reference's
one augmented batch, percentile, MSE), on the FP network or, with ``calib_weights="quantized"``,
on the network with quantized weights. ``probe="bn"`` puts a parameter-free BatchNorm before the
linear layer (as the SimSiam and MAE linear protocols do); it is folded into the saved layer.

``ptq="adaround"`` / ``"brecq"`` then learns the weights' rounding on ``ptq_images`` training
images (:mod:`ssql_core.ptq`); the learned integers and ranges are kept in ``heads.pt`` so an
exported classifier is the evaluated model.

Each result row names bits, protocol, path, probe, calibration, ptq, top1 (%), calibration images,
epochs and the probe's training loss (per-epoch means in ``loss_curve``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from ssql_core.bitconfig import MixedBits, as_bits, footprint, layer_table, resolve
from ssql_core.calibration import calibrate_ranges
from ssql_core.config import EvalConfig
from ssql_core.data import (
    SeededViews,
    Transformed,
    linear_train_transform,
    load_split,
    stats_key_for,
    test_transform,
)
from ssql_core.errors import Cancelled, ConfigError
from ssql_core.hooks import Hooks, Progress
from ssql_core.mixed_precision.autobit import AutobitConfig, allocate, check_budget, costs_for
from ssql_core.ptq import (
    ReconConfig,
    Reconstruction,
    apply_reconstruction,
    clear_rounding,
    reconstruct,
)
from ssql_core.qnn import QuantContext, bind_context
from ssql_core.runtime import resolve_device, seed_everything, to_input
from ssql_core.train import load_pretrained

HEADS = "heads.pt"


@torch.no_grad()
def calibrate(backbone: nn.Module, ctx: QuantContext, images: DataLoader, device: torch.device) -> int:
    """Record activation ranges over ``images`` with FP forwards in eval mode; returns the count."""
    backbone.eval()
    n = 0
    with ctx.recording():
        for x, _ in images:
            backbone(to_input(x, device, False))
            n += len(x)
    return n


def reference_calibration_images(train: Any, image_size: int, stats_key: str, images: int, seed: int) -> DataLoader:
    """The reference code's calibration: one batch of ``images`` training images drawn at random,
    with the linear-training augmentation (RandomResizedCrop 0.8-1 + flip), seeded."""
    aug = SeededViews(train, linear_train_transform(image_size, stats_key), seed, n_views=1, with_label=True)
    idx = torch.randperm(len(aug), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    return DataLoader(Subset(aug, idx), batch_size=len(idx))


def calibration_set(method: str, train: Any, plain: Any, image_size: int, stats_key: str, images: int, seed: int,
                    batch_size: int = 256) -> DataLoader:
    """The calibration images of ``method``: the reference's augmented batch of ``train`` for
    ``"reference"``, the protocol's test-transformed subset of ``plain`` for every other method."""
    if method == "reference":
        return reference_calibration_images(train, image_size, stats_key, images, seed)
    return calibration_images(plain, images, seed, batch_size)


def calibration_images(plain: Any, images: int, seed: int, batch_size: int = 256) -> DataLoader:
    """The protocol's calibration set: a seeded random subset of the (test-transformed) training
    images. Export calls this too, so an exported checkpoint has the ranges its evaluation had."""
    idx = torch.randperm(len(plain), generator=torch.Generator().manual_seed(seed))[:images].tolist()
    return DataLoader(Subset(plain, idx), batch_size=min(batch_size, 256))


@torch.no_grad()
def extract(backbone: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone(to_input(x, device, False)).float())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels).to(device)


def knn_top1(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, num_classes: int, k: int, t: float) -> float:
    """Weighted kNN (InstDisc): votes exp(cos/T) of the k nearest training features."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim = test_f[i:i + 1024] @ train_f.t()
        w, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (w / t).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100.0 * correct / len(test_f)


def materialize(ds: Any, max_bytes: int = 2**30) -> Any:
    """The deterministic eval images as one tensor when they fit in ``max_bytes`` (computed once,
    reused for every bit-width); otherwise the lazy dataset."""
    if len(ds) == 0:
        return ds
    x0, _ = ds[0]
    if len(ds) * x0.numel() * 4 > max_bytes:
        return ds
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys))


def _lr_at(cfg: EvalConfig, epoch: int) -> float:
    drops = sum(epoch >= int(m * cfg.epochs) for m in cfg.lr_milestones)
    return cfg.lr * 0.1**drops


def make_probe(feat_dim: int, num_classes: int, probe: str) -> nn.Module:
    """The classifier being trained: a linear layer, after a parameter-free BatchNorm for ``"bn"``."""
    linear = nn.Linear(feat_dim, num_classes)
    return nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False), linear) if probe == "bn" else linear


@torch.no_grad()
def fold_probe(probe: nn.Module) -> nn.Linear:
    """One linear layer computing what the (eval-mode) probe computes: BN folded into it."""
    if isinstance(probe, nn.Linear):
        return probe
    bn, linear = probe[0], probe[1]
    inv = (bn.running_var + bn.eps).rsqrt()
    out = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.device)
    out.weight.copy_(linear.weight * inv)
    out.bias.copy_(linear.bias - (linear.weight * inv) @ bn.running_mean)
    return out


def train_linear_cached(train_f: Tensor, train_y: Tensor, num_classes: int, cfg: EvalConfig, on_epoch: Any) -> nn.Linear:
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = make_probe(train_f.shape[1], num_classes, cfg.probe).to(train_f.device)
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    for epoch in range(cfg.epochs):
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(cfg, epoch)
        perm = torch.randperm(len(train_f), generator=g).to(train_f.device)
        total, batches = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if len(idx) < 2 and cfg.probe == "bn":
                continue
            loss = F.cross_entropy(head(train_f[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        on_epoch(epoch, total / max(batches, 1))
    return fold_probe(head.eval())


def train_linear_augmented(backbone: nn.Module, data: SeededViews, num_classes: int, cfg: EvalConfig,
                           device: torch.device, on_epoch: Any) -> nn.Linear:
    torch.manual_seed(cfg.seed)
    head = make_probe(backbone_feat_dim(backbone), num_classes, cfg.probe).to(device)
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    backbone.eval()
    for epoch in range(cfg.epochs):
        data.set_epoch(epoch)
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(cfg, epoch)
        loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=g, num_workers=cfg.num_workers,
                            drop_last=cfg.probe == "bn" and len(data) > cfg.batch_size)
        total, batches = 0.0, 0
        for x, y in loader:
            with torch.no_grad():
                f = backbone(to_input(x, device, False)).float()
            loss = F.cross_entropy(head(f), torch.as_tensor(y, device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
        on_epoch(epoch, total / max(batches, 1))
    return fold_probe(head.eval())


def backbone_feat_dim(backbone: nn.Module) -> int:
    return int(backbone.feat_dim)


@torch.no_grad()
def accuracy(head: nn.Linear, f: Tensor, y: Tensor) -> float:
    return 100.0 * (head(f).argmax(1) == y).float().mean().item()


def evaluate(cfg: EvalConfig, workdir: str | Path | None = None, hooks: Hooks | None = None) -> list[dict[str, Any]]:
    """Evaluate the backbone of a pretrain checkpoint at ``cfg.bits``; see module docstring."""
    cfg = cfg.validate()
    hooks = hooks or Hooks()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    pcfg, method = load_pretrained(cfg.checkpoint)
    backbone = method.backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    # rounding and normalization default to what the checkpoint was trained with
    rounding = cfg.rounding or pcfg.rounding or "reciprocal"
    normalization = cfg.normalization or pcfg.normalization or "standard"
    ctx = bind_context(backbone, QuantContext(rounding=rounding))
    dataset = cfg.dataset or pcfg.dataset
    size = pcfg.image_size
    specs, table, autobit = _bit_specs(cfg, backbone, size)  # a map or budget this backbone cannot take: refused before any work
    train = load_split(dataset, True, size, cfg.data_root, cfg.allow_download, cfg.max_samples, cfg.seed)
    test = load_split(dataset, False, size, cfg.data_root, cfg.allow_download, None, cfg.seed)
    stats_key = stats_key_for(train.stats_key, normalization)
    ttf = test_transform(size, stats_key, cfg.interpolation)
    train_plain = materialize(Transformed(train.data, ttf))
    test_plain = materialize(Transformed(test.data, ttf))
    calib_loader = calibration_set(cfg.calibration, train.data, train_plain, size, stats_key, cfg.calib_images,
                                   cfg.seed, cfg.batch_size)

    ptq_loader = calibration_images(train_plain, cfg.ptq_images, cfg.seed, cfg.batch_size) if cfg.ptq != "calibrate" else None
    reconstructions: dict[str, Reconstruction] = {}

    def loader(ds: Any) -> DataLoader:
        return DataLoader(ds, batch_size=cfg.batch_size, num_workers=cfg.num_workers)

    rows: list[dict[str, Any]] = []
    heads: dict[str, dict[str, Tensor]] = {}
    bit_configs: dict[str, dict[str, str]] = {}
    n_bits = len(specs) + (autobit is not None)
    t0 = time.perf_counter()

    def run_bits(bi: int, bits: Any, extra: dict[str, Any]) -> None:
        calib_n = 0 if bits.is_fp else calibrate_ranges(
            backbone, ctx, calib_loader, device, bits, cfg.calibration, cfg.calib_percentile,
            quantized_weights=cfg.calib_weights == "quantized", seed=cfg.seed)
        if ptq_loader is not None and not bits.is_fp:
            recon = reconstruct_for_eval(backbone, ctx, ptq_loader, device, bits, cfg, hooks, workdir, bi, n_bits, t0)
            reconstructions[str(bits)] = recon
            apply_reconstruction(backbone, recon)
        curve: list[float] = []

        def on_epoch(epoch: int, loss: float) -> None:
            curve.append(loss)
            done = bi + (epoch + 1) / cfg.epochs
            _report(hooks, cfg, "linear", done, n_bits, t0, loss, {"bits_index": bi})
            if hooks.should_stop():
                raise Cancelled(f"cancelled while evaluating {bits}")

        with ctx.quantized(bits), _cleared(backbone):
            test_f, test_y = extract(backbone, loader(test_plain), device)
            if cfg.protocol == "knn" or cfg.path == "cached":
                train_f, train_y = extract(backbone, loader(train_plain), device)
            if cfg.protocol == "knn":
                top1 = knn_top1(train_f, train_y, test_f, test_y, train.num_classes, cfg.knn_k, cfg.knn_t)
                head = None
                _report(hooks, cfg, "knn", bi + 1, n_bits, t0, None, {})
            elif cfg.path == "cached":
                with torch.enable_grad():
                    head = train_linear_cached(train_f, train_y, train.num_classes, cfg, on_epoch)
            else:
                aug = SeededViews(train.data, linear_train_transform(size, stats_key), cfg.seed, n_views=1, with_label=True)
                with torch.enable_grad():
                    head = train_linear_augmented(backbone, aug, train.num_classes, cfg, device, on_epoch)
            if head is not None:
                top1 = accuracy(head, test_f, test_y)
                heads[str(bits)] = {k: v.detach().cpu() for k, v in head.state_dict().items()}
        if isinstance(bits, MixedBits):
            bit_configs[str(bits)] = bits.config.as_dict()
        rows.append({
            "bits": str(bits), "protocol": cfg.protocol,
            "path": "knn" if cfg.protocol == "knn" else cfg.path,
            "top1": round(top1, 3), "calib_images": calib_n,
            "epochs": 0 if cfg.protocol == "knn" else cfg.epochs,
            "dataset": dataset, "train_images": len(train.data), "test_images": len(test.data),
            "calibration": cfg.calibration, "calib_weights": cfg.calib_weights, "preset": cfg.preset,
            "interpolation": cfg.interpolation, "normalization": normalization, "rounding": rounding, "ptq": cfg.ptq,
            **(_ptq_row(reconstructions[str(bits)]) if str(bits) in reconstructions else {}),
            **({"calib_percentile": cfg.calib_percentile} if cfg.calibration == "percentile" else {}),
            **({"knn_k": cfg.knn_k, "knn_t": cfg.knn_t} if cfg.protocol == "knn" else
               {"lr": cfg.lr, "probe": cfg.probe, "train_loss": round(curve[-1], 4) if curve else None,
                "loss_curve": [round(v, 4) for v in curve]}),
            **footprint(table, bits),
            **({"bit_config": bits.config.as_dict()} if isinstance(bits, MixedBits) else {}),
            **extra,
        })

    for bi, bits in enumerate(specs):
        run_bits(bi, bits, {})
    if autobit is not None:
        config, report = choose_bits(backbone, ctx, autobit, table, train_plain, train.num_classes, heads.get("fp"), cfg, device,
                                     rounding, hooks, len(specs), n_bits, t0, loader)
        run_bits(len(specs), resolve(config, backbone), {"autobit": report})
    if workdir is not None and heads:
        from ssql_core.checkpoint import save_atomic

        save_atomic({"kind": "linear_heads", "config": cfg.to_dict(), "pretrain_config": pcfg.to_dict(),
                     "num_classes": train.num_classes, "heads": heads, "rows": rows,
                     "ptq": {k: r.to_state() for k, r in reconstructions.items()}, "bit_configs": bit_configs},
                    Path(workdir) / HEADS)
    if workdir is not None:
        for b in reconstructions:  # finished: the per-unit resume states are no longer needed
            (Path(workdir) / f"ptq-{b}.pt").unlink(missing_ok=True)
    return rows


def choose_bits(backbone: nn.Module, ctx: QuantContext, autobit: AutobitConfig, table: Any, train_plain: Any, num_classes: int,
                fp_head: dict[str, Tensor] | None, cfg: EvalConfig, device: torch.device, rounding: str, hooks: Hooks,
                bi: int, n_bits: int, t0: float, loader: Any) -> tuple[Any, dict[str, Any]]:
    """Autobit's sensitivity and allocation (:mod:`ssql_core.mixed_precision.autobit`); the configuration and
    what its row reports. The Hessian is taken of the evaluation's FP probe (its ``fp`` head, or
    one trained now on FP features with the evaluation's settings)."""
    t_sens = time.perf_counter()
    images = calibration_images(train_plain, autobit.images, cfg.seed, cfg.batch_size)
    head, probe_source = None, None
    if autobit.sensitivity == "hessian":
        if fp_head is not None:
            head, probe_source = nn.Linear(fp_head["weight"].shape[1], fp_head["weight"].shape[0]).to(device), "the evaluation's fp head"
            head.load_state_dict(fp_head)
        else:
            train_f, train_y = extract(backbone, loader(train_plain), device)
            with torch.enable_grad():
                head = train_linear_cached(train_f, train_y, num_classes, cfg, lambda *_: None)
            probe_source = "an FP probe trained for the sensitivity (the evaluation's settings)"

    def progress(done: int, total: int) -> None:
        _report(hooks, cfg, "autobit", bi + done / total, n_bits, t0, None, {"bits_index": bi})
        if hooks.should_stop():
            raise Cancelled("cancelled while measuring layer sensitivities")

    costs, details = costs_for(autobit, backbone, ctx, images, device, head, rounding, cfg.seed, progress)
    sens_seconds = time.perf_counter() - t_sens
    config, alloc = allocate(table, autobit, costs)
    report = {**autobit.to_dict(), **alloc.summary(), "sensitivity_seconds": round(sens_seconds, 3),
              "sensitivity_images": len(images.dataset),  # type: ignore[arg-type]
              **({"probe": probe_source} if probe_source else {}), **details,
              "costs": {n: [float(f"{c:.6g}") for c in v] for n, v in costs.items()}}
    return config, report


def _bit_specs(cfg: EvalConfig, backbone: nn.Module, image_size: int) -> tuple[list[Any], Any, AutobitConfig | None]:
    """The bit-widths and resolved per-layer maps of ``cfg.bits``, the backbone's layer table and
    the autobit settings; ``ConfigError`` naming ``bits`` or the budget when the backbone cannot
    take them."""
    specs = []
    for b in cfg.bits:
        try:
            specs.append(as_bits(b, backbone))
        except ValueError as e:
            raise ConfigError("bits", str(e)) from None
    table = layer_table(backbone, image_size)
    autobit = AutobitConfig.from_dict(cfg.autobit).validate() if cfg.autobit is not None else None
    if autobit is not None:
        check_budget(table, autobit)
    return specs, table, autobit


@contextlib.contextmanager
def _cleared(backbone: nn.Module) -> Iterator[None]:
    """Learned roundings stay on the backbone for one bit-width only."""
    try:
        yield
    finally:
        clear_rounding(backbone)


def ptq_config(cfg: EvalConfig) -> ReconConfig:
    """The reconstruction settings of an evaluation (the papers' values for the rest)."""
    return ReconConfig(method=cfg.ptq, iters=cfg.ptq_iters, learn_act=cfg.brecq_learn_act, seed=cfg.seed)


def reconstruct_for_eval(backbone: nn.Module, ctx: QuantContext, images: DataLoader, device: torch.device, bits: Any,
                         cfg: EvalConfig, hooks: Hooks, workdir: str | Path | None, bi: int, n_bits: int, t0: float) -> Reconstruction:
    """AdaRound / BRECQ at ``bits`` (ranges calibrated), resumable from ``workdir/ptq-{bits}.pt``."""

    def progress(done: int, total: int, _unit: dict[str, Any]) -> None:
        _report(hooks, cfg, "ptq", bi + done / total, n_bits, t0, None, {"bits_index": bi, "units_done": done})
        if hooks.should_stop():
            raise Cancelled(f"cancelled while reconstructing {bits}")

    checkpoint = Path(workdir) / f"ptq-{bits}.pt" if workdir is not None else None
    return reconstruct(backbone, ctx, images, device, bits, ptq_config(cfg), checkpoint, progress)


def _ptq_row(rec: Reconstruction) -> dict[str, Any]:
    s = rec.summary()
    return {"ptq_images": s["images"], "ptq_iters": s["iters"], "ptq_units": s["units"], "ptq_units_learned": s["units_learned"],
            "ptq_seconds": s["seconds"], **({"brecq_learn_act": s["learn_act"]} if rec.method == "brecq" else {})}


def _report(hooks: Hooks, cfg: EvalConfig, phase: str, done: float, total: int, t0: float, loss: float | None, metrics: dict[str, float]) -> None:
    """``done`` counts bit-widths finished (fractional within one); epochs/steps are classifier
    epochs summed over all bit-widths, so "epoch 120/400" reads as it does for pretraining."""
    elapsed = time.perf_counter() - t0
    frac = min(done / total, 1.0)
    per_bits = max(cfg.epochs, 1) if phase == "linear" else 1
    hooks.on_progress(Progress(
        phase=phase, epoch=round(done * per_bits), epochs=total * per_bits, step=round(done * per_bits),
        total_steps=total * per_bits, fraction=frac, loss=loss,
        eta_s=elapsed / frac * (1 - frac) if frac > 0 else None, metrics=metrics,
    ))


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of result rows, one line per bit-width."""
    bw = max([6, *(len(str(r["bits"])) for r in rows)])
    lines = [f"{'bits':>{bw}}  {'protocol':>8}  {'path':>9}  {'probe':>6}  {'calibration':>11}  {'top1 %':>7}  {'calib':>6}  {'epochs':>6}  {'loss':>8}"]
    for r in rows:
        loss = r.get("train_loss")
        lines.append(f"{r['bits']:>{bw}}  {r['protocol']:>8}  {r['path']:>9}  {r.get('probe', '-'):>6}  {r.get('calibration', 'minmax'):>11}  "
                     f"{r['top1']:7.2f}  {r['calib_images']:6d}  {r['epochs']:6d}  {'-' if loss is None else f'{loss:8.3f}':>8}")
    if any(r.get("ptq", "calibrate") != "calibrate" for r in rows):  # reconstruction PTQ: name it per row
        lines = [f"{line}  {'ptq' if i == 0 else rows[i - 1].get('ptq', 'calibrate'):>9}" for i, line in enumerate(lines)]
    if all("model_bytes" in r for r in rows):  # the model's size and its average weight bits (decision 020)
        lines = [f"{line}  {'KB':>8}  {'w bits':>6}" if i == 0 else
                 f"{line}  {rows[i - 1]['model_bytes'] / 1000:8.1f}  {rows[i - 1]['weight_bits_avg']:6.2f}" for i, line in enumerate(lines)]
    return "\n".join(lines)
