"""Reconstruction PTQ driver: AdaRound layer by layer, BRECQ block by block (docs/decisions/016).

For one bit-width, after the activation ranges were calibrated, units (a weight layer for
``adaround``; a residual block, or a weight layer outside any block, for ``brecq``) are
reconstructed in forward order. Unit ``k`` learns its weights' rounding
(:mod:`ssql_core.ptq.adaround`) so that, **on inputs from the quantized network** (units before
``k`` already at their learned integers, activations quantized with their ranges), its output
matches the **FP network's** output of the unit on the calibration images (asymmetric
reconstruction, as the AdaRound paper and the BRECQ code). The loss is the squared error summed
over channels, averaged over images and positions, weighted per channel by the following
BatchNorm's ``(gamma / sigma)^2`` for a layer (the layer as BN-folded), by the normalised Fisher
diagonal for ``brecq`` (:mod:`ssql_core.ptq.brecq`). A block's own output quant point is off
while its rounding is learned (the next unit sees it quantized).

After the iterations the hard integers are compared, on every calibration image, with nearest
rounding's on that objective, and the better is kept (recorded per unit): reconstruction never
leaves a unit worse than PTQ without it on the data it saw. A non-finite loss raises
:class:`ReconstructionDiverged` naming the unit and the iteration. With ``checkpoint`` set, the
state after every unit is written atomically and a rerun with the same inputs continues there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.ops.misc import Conv2dNormActivation

from ssql_core.bitconfig import MixedBits, as_bits, point_act_bits
from ssql_core.bits import BitWidth
from ssql_core.errors import NonFiniteLoss
from ssql_core.ptq.adaround import AdaRoundWeight, BetaSchedule
from ssql_core.ptq.brecq import BLOCK_TYPES, LearnedStep, fisher_weights
from ssql_core.ptq.rounding import (
    LearnedRounding,
    Reconstruction,
    current_ranges,
    layer_bits,
    set_rounding,
)
from ssql_core.qnn import (
    ActQuant,
    Mode,
    QConv2d,
    QLinear,
    QuantContext,
    act_points,
    weight_points,
)
from ssql_core.runtime import to_input


class ReconstructionDiverged(NonFiniteLoss):
    """A reconstruction's loss (or the outputs it reconstructs) became NaN or infinite."""


@dataclass
class ReconConfig:
    """Settings of one reconstruction (the paper's / BRECQ code's values unless said)."""

    method: str = "adaround"  # "adaround" or "brecq"
    iters: int = 2000  # per unit (the papers: 10k-20k on ImageNet)
    batch_size: int = 32
    lr: float = 1e-3  # Adam on V
    reg_weight: float = 0.01  # lambda of the rounding regularizer
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    learn_act: bool = False  # brecq: learn activation step sizes in a second pass
    act_lr: float = 4e-5
    seed: int = 0

    def settings(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("method")
        d["beta"] = list(self.beta)
        return d


@dataclass
class Unit:
    name: str
    module: nn.Module
    weights: dict[str, nn.Module]
    acts: dict[str, ActQuant]
    out_point: str | None  # the act point producing the unit's output (off while rounding is learned)
    channel_weight: Tensor | None  # adaround: (gamma/sigma)^2 of the following BN, mean 1
    end: int  # forward-order index of the unit's last quant point


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


# ---------------------------------------------------------------------------------------------
# units


@torch.no_grad()
def plan_units(backbone: nn.Module, ctx: QuantContext, method: str, x: Tensor) -> tuple[list[Unit], dict[str, int]]:
    """The units of ``method`` in forward order, and every quant point's forward-order index."""
    names = {m: n for n, m in backbone.named_modules()}
    order: dict[str, int] = {}
    conv_out: dict[int, tuple[str, Tensor]] = {}  # outputs kept alive so their ids stay unique
    bn_after: dict[str, nn.BatchNorm2d] = {}
    handles = []

    def pre(m: nn.Module, _inp: Any) -> None:
        order.setdefault(names[m], len(order))

    def post_w(m: nn.Module, _inp: Any, out: Tensor) -> None:
        conv_out[id(out)] = (names[m], out)

    def post_bn(m: nn.Module, inp: Any, _out: Tensor) -> None:
        hit = conv_out.get(id(inp[0]))
        if hit is not None:
            bn_after.setdefault(hit[0], m)  # type: ignore[arg-type]

    for m in backbone.modules():
        if isinstance(m, (QConv2d, QLinear, ActQuant, Conv2dNormActivation, *BLOCK_TYPES)):
            handles.append(m.register_forward_pre_hook(pre))
        if isinstance(m, (QConv2d, QLinear)):
            handles.append(m.register_forward_hook(post_w))
        if isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_hook(post_bn))
    try:
        with ctx.mode_as(Mode.FP):
            backbone.eval()(x)
    finally:
        for h in handles:
            h.remove()
    wpoints = {n: m for n, m in weight_points(backbone).items() if n in order}
    apoints = {n: m for n, m in act_points(backbone).items() if n in order}
    units: list[Unit] = []
    if method == "brecq":
        containers = [(n, m) for n, m in backbone.named_modules()
                      if n in order and isinstance(m, (Conv2dNormActivation, *BLOCK_TYPES))]
        taken: set[str] = set()
        for n, m in containers:
            if any(n.startswith(o + ".") for o, _ in containers if o != n):
                continue  # nested in another unit
            ws = {k: v for k, v in wpoints.items() if k.startswith(n + ".")}
            acts = {k: v for k, v in apoints.items() if k.startswith(n + ".")}
            out = getattr(m, "act_out", None)
            units.append(Unit(n, m, ws, acts, f"{n}.act_out" if isinstance(out, ActQuant) else None, None,
                              max(order[k] for k in (*ws, *acts, n))))
            taken |= set(ws)
        for n, m in wpoints.items():
            if n not in taken:
                units.append(Unit(n, m, {n: m}, {}, None, None, order[n]))
    else:
        for n, m in wpoints.items():
            bn = bn_after.get(n)
            cw = None
            if bn is not None:
                s2 = (bn.weight.detach().float() if bn.affine else torch.ones_like(bn.running_var)).pow(2) / (bn.running_var.float() + bn.eps)
                cw = (s2 / s2.mean().clamp_min(1e-12)).reshape(1, -1, 1, 1)
            units.append(Unit(n, m, {n: m}, {}, None, cw, order[n]))
    units.sort(key=lambda u: order.get(u.name, u.end))
    return units, {**{n: order[n] for n in wpoints}, **{n: order[n] for n in apoints}}


# ---------------------------------------------------------------------------------------------
# data


def _capture(backbone: nn.Module, ctx: QuantContext, batches: list[Tensor], module: nn.Module, what: str,
             bits: BitWidth | None) -> Tensor:
    """The input (``what="input"``) or output of ``module`` over all batches, with the network
    quantized at ``bits`` (``None``: FP). The forward stops at the module."""
    store: list[Tensor] = []

    def pre(_m: nn.Module, inp: Any) -> None:
        store.append(inp[0].detach())
        raise _Stop

    def post(_m: nn.Module, _inp: Any, out: Tensor) -> None:
        store.append(out.detach())
        raise _Stop

    h = module.register_forward_pre_hook(pre) if what == "input" else module.register_forward_hook(post)
    mode = ctx.quantized(bits) if bits is not None else ctx.mode_as(Mode.FP)
    try:
        with torch.no_grad(), mode:
            for x in batches:
                try:
                    backbone(x)
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(store)


def _fisher(backbone: nn.Module, ctx: QuantContext, batches: list[Tensor], fp_feats: list[Tensor], unit: Unit,
            order: dict[str, int], bits: BitWidth) -> Tensor:
    """Squared-gradient weights at ``unit``'s output: the network quantized up to the unit, FP after."""
    later_w = [m for n, m in weight_points(backbone).items() if order.get(n, -1) > unit.end]
    later_a = [m for n, m in act_points(backbone).items() if order.get(n, -1) > unit.end]
    for m in later_w:
        m.__dict__["weight_override"] = _fp_weight
    for m in later_a:
        m.__dict__["act_override"] = _identity
    grads: list[Tensor] = []
    leaf: list[Tensor] = []

    def post(_m: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        t = out.detach().requires_grad_(True)
        leaf.append(t)
        return t

    h = unit.module.register_forward_hook(post)
    try:
        with torch.enable_grad(), ctx.quantized(bits):
            for x, f in zip(batches, fp_feats, strict=True):
                leaf.clear()
                feats = backbone(x)
                (feats.float() - f).pow(2).sum().backward()
                grads.append(leaf[0].grad.detach())  # type: ignore[union-attr]
    finally:
        h.remove()
        for m in later_w:
            m.__dict__.pop("weight_override", None)
        for m in later_a:
            m.__dict__.pop("act_override", None)
    return fisher_weights(torch.cat(grads))


def _fp_weight(m: nn.Module, _bits: Any) -> Tensor:
    return m.weight


def _identity(x: Tensor, _bits: Any) -> Tensor:
    return x


def _sq_err(pred: Tensor, tgt: Tensor, w: Tensor | None) -> Tensor:
    """Per-element weighted squared error; BRECQ's reduction is ``.sum(1).mean()``."""
    err = (pred.float() - tgt.float()).pow(2)
    return err * w if w is not None else err


def _per_row(err: Tensor) -> Tensor:
    return err.sum(1).mean()


# ---------------------------------------------------------------------------------------------
# the optimisation of one unit


def _full_loss(unit: Unit, ctx: QuantContext, bits: BitWidth, x: Tensor, y: Tensor, w: Tensor | None, batch: int) -> float:
    """The unit's objective on every calibration image with the overrides currently set."""
    total, rows = 0.0, 0
    with torch.no_grad(), ctx.quantized(bits):
        for i in range(0, len(x), batch):
            wi = w[i:i + batch] if w is not None and w.shape[0] == len(x) else w
            err = _sq_err(unit.module(x[i:i + batch]), y[i:i + batch], wi)
            total += float(err.sum(1).sum())
            rows += err[:, 0].numel()
    return total / max(rows, 1)


def _check_finite(t: Tensor, what: str, unit: Unit, bits: BitWidth) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ReconstructionDiverged(f"reconstruction of {unit.name} at {bits}: the {what} on the calibration images are not "
                                     "finite (NaN or infinite); the checkpoint or the calibration images are broken")


def _learn_rounding(unit: Unit, ctx: QuantContext, bits: BitWidth, x: Tensor, y: Tensor, w: Tensor | None,
                    cfg: ReconConfig, index: int, points: dict[str, ActQuant]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    adas = {n: AdaRoundWeight(m.weight, layer_bits(m, bits)) for n, m in unit.weights.items()}
    out_point = points.get(unit.out_point) if unit.out_point else None
    if out_point is not None:
        out_point.__dict__["act_override"] = _identity
    try:
        for n, m in unit.weights.items():
            m.__dict__["weight_override"] = adas[n].weight_for
        params = [a.v for a in adas.values()]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        sched = BetaSchedule(cfg.iters, cfg.warmup, cfg.beta[0], cfg.beta[1])
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
        n_img = len(x)
        per_image_w = w is not None and w.shape[0] == n_img
        rec = torch.zeros(())
        with torch.enable_grad(), ctx.quantized(bits):
            for t in range(cfg.iters):
                idx = torch.randperm(n_img, generator=g)[:cfg.batch_size].to(x.device)
                wi = w[idx] if per_image_w else w  # type: ignore[index]
                rec = _per_row(_sq_err(unit.module(x[idx]), y[idx], wi))
                loss = rec
                if sched.active(t):
                    beta = sched.beta(t)
                    loss = rec + cfg.reg_weight * sum((a.round_loss(beta) for a in adas.values()), torch.zeros((), device=rec.device))
                if not torch.isfinite(loss):
                    raise ReconstructionDiverged(f"reconstruction of {unit.name} at {bits} diverged: loss {float(loss)} at iteration "
                                                 f"{t + 1}/{cfg.iters}; nothing was kept (try fewer iterations or check the checkpoint)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        learned = {n: a.hard_ints() for n, a in adas.items()}
        for n, m in unit.weights.items():
            m.__dict__["weight_override"] = LearnedRounding(learned[n], adas[n].bits)
        loss_learned = _full_loss(unit, ctx, bits, x, y, w, cfg.batch_size)
        for m in unit.weights.values():
            m.__dict__.pop("weight_override", None)
        loss_nearest = _full_loss(unit, ctx, bits, x, y, w, cfg.batch_size)
    finally:
        for m in unit.weights.values():
            m.__dict__.pop("weight_override", None)
        if out_point is not None:
            out_point.__dict__.pop("act_override", None)
    if not (torch.isfinite(torch.tensor(loss_learned)) and torch.isfinite(torch.tensor(loss_nearest))):
        raise ReconstructionDiverged(f"reconstruction of {unit.name} at {bits}: non-finite objective "
                                     f"(learned {loss_learned}, nearest {loss_nearest})")
    kept = "learned" if loss_learned <= loss_nearest else "nearest"
    ints = learned if kept == "learned" else {}
    return ints, {"unit": unit.name, "stage": "weights", "loss_nearest": loss_nearest, "loss_learned": loss_learned, "kept": kept}


def _learn_steps(unit: Unit, ctx: QuantContext, bits: BitWidth, x: Tensor, y: Tensor, w: Tensor | None,
                 cfg: ReconConfig, index: int) -> dict[str, Any]:
    """BRECQ's second pass for one unit: its activation points' step sizes (weights fixed)."""
    steps = {n: LearnedStep(p.lo, p.hi, point_act_bits(n, p, bits)).to(x.device) for n, p in unit.acts.items()}
    before = {n: (p.lo.clone(), p.hi.clone()) for n, p in unit.acts.items()}
    loss_calibrated = _full_loss(unit, ctx, bits, x, y, w, cfg.batch_size)
    try:
        for n, p in unit.acts.items():
            p.__dict__["act_override"] = steps[n].quantize
        opt = torch.optim.Adam([s.step for s in steps.values()], lr=cfg.act_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters, eta_min=0.0)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 500_009 + index)
        n_img = len(x)
        per_image_w = w is not None and w.shape[0] == n_img
        with torch.enable_grad(), ctx.quantized(bits):
            for t in range(cfg.iters):
                idx = torch.randperm(n_img, generator=g)[:cfg.batch_size].to(x.device)
                loss = _per_row(_sq_err(unit.module(x[idx]), y[idx], w[idx] if per_image_w else w))  # type: ignore[index]
                if not torch.isfinite(loss):
                    raise ReconstructionDiverged(f"activation step learning of {unit.name} at {bits} diverged: loss {float(loss)} "
                                                 f"at iteration {t + 1}/{cfg.iters}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        for p in unit.acts.values():
            p.__dict__.pop("act_override", None)
    for n, p in unit.acts.items():  # the learned steps as PSQ ranges: the model export stores
        rng = steps[n].range().to(p.lo.device)
        p.lo.fill_(float(rng[0]))
        p.hi.fill_(float(rng[1]))
    loss_learned = _full_loss(unit, ctx, bits, x, y, w, cfg.batch_size)
    kept = "learned" if loss_learned <= loss_calibrated else "calibrated"
    if kept == "calibrated":
        for n, p in unit.acts.items():
            p.lo.copy_(before[n][0])
            p.hi.copy_(before[n][1])
    return {"unit": unit.name, "stage": "activations", "loss_calibrated": loss_calibrated, "loss_learned": loss_learned, "kept": kept}


# ---------------------------------------------------------------------------------------------
# the driver


def _fingerprint(backbone: nn.Module, bits: BitWidth, cfg: ReconConfig, batches: list[Tensor]) -> str:
    """What a resumed reconstruction must share with the interrupted one: weights, ranges,
    calibration images, bits and settings."""
    h = hashlib.sha256(f"{cfg.method}|{bits}|{sorted(cfg.settings().items())}".encode())
    for n, m in weight_points(backbone).items():
        h.update(n.encode())
        h.update(m.weight.detach().float().cpu().contiguous().numpy().tobytes())
    for n, r in current_ranges(backbone).items():
        h.update(n.encode())
        h.update(r.numpy().tobytes())
    for x in batches:
        h.update(x.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def reconstruct(backbone: nn.Module, ctx: QuantContext, images: Iterable[Any], device: torch.device, bits: str | BitWidth,
                cfg: ReconConfig, checkpoint: str | Path | None = None,
                progress: Callable[[int, int, dict[str, Any]], None] | None = None) -> Reconstruction:
    """Reconstruct ``backbone`` (ranges already calibrated for ``bits``) on ``images`` (batches
    ``x`` or ``(x, y, ...)``); see the module docstring. The backbone is left without overrides:
    apply the result with :func:`ssql_core.ptq.apply_reconstruction`. ``progress(done, total,
    unit_stats)`` is called after each unit (it may raise to cancel)."""
    from ssql_core.checkpoint import load, save_atomic

    b = as_bits(bits, backbone)
    if b.is_fp:
        raise ValueError("reconstruction needs a quantized bit-width, not fp")
    if cfg.method not in ("adaround", "brecq"):
        raise ValueError(f"unknown reconstruction method {cfg.method!r}: 'adaround' or 'brecq'")
    t0 = time.perf_counter()
    backbone.eval()
    batches = [to_input(x if isinstance(x, Tensor) else x[0], device, False) for x in images]
    if not batches:
        raise ValueError("reconstruction needs at least one calibration image")
    units, order = plan_units(backbone, ctx, cfg.method, batches[0][:2])
    points = act_points(backbone)
    initial_ranges = current_ranges(backbone)
    learn_act = cfg.method == "brecq" and cfg.learn_act
    work = [("weights", i, u) for i, u in enumerate(units)]
    work += [("activations", i, u) for i, u in enumerate(units) if learn_act and u.acts]
    ints: dict[str, Tensor] = {}
    stats: list[dict[str, Any]] = []
    done = 0
    key = _fingerprint(backbone, b, cfg, batches) if checkpoint is not None else ""
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            state = load(checkpoint)
        except Exception:  # noqa: BLE001 - an unreadable partial state is simply not resumed
            state = None
        if isinstance(state, dict) and state.get("key") == key:
            ints, stats, done = dict(state["ints"]), list(state["units"]), int(state["done"])
            for n, r in state["ranges"].items():
                points[n].lo.fill_(float(r[0]))
                points[n].hi.fill_(float(r[1]))
    try:
        fp_feats: list[Tensor] = []
        if cfg.method == "brecq":
            with torch.no_grad(), ctx.mode_as(Mode.FP):
                fp_feats = [backbone(x).detach().float() for x in batches]
        for k, (stage, i, unit) in enumerate(work):
            if k < done:
                continue
            set_rounding(backbone, ints, b)
            t_unit = time.perf_counter()
            x = _capture(backbone, ctx, batches, unit.module, "input", b)
            y = _capture(backbone, ctx, batches, unit.module, "output", None)
            _check_finite(x, "quantized network's inputs", unit, b)
            _check_finite(y, "FP network's outputs", unit, b)
            w = _fisher(backbone, ctx, batches, fp_feats, unit, order, b) if cfg.method == "brecq" else unit.channel_weight
            if w is not None:
                _check_finite(w, "Fisher weights", unit, b)
            if stage == "weights":
                learned, st = _learn_rounding(unit, ctx, b, x, y, w, cfg, i, points)
                ints.update({n: t.cpu() for n, t in learned.items()})
            else:
                st = _learn_steps(unit, ctx, b, x, y, w, cfg, i)
            st["seconds"] = round(time.perf_counter() - t_unit, 3)
            stats.append(st)
            done = k + 1
            if checkpoint is not None:
                save_atomic({"key": key, "done": done, "ints": ints, "units": stats, "ranges": current_ranges(backbone)},
                            checkpoint)
            if progress is not None:
                progress(done, len(work), st)
    except BaseException:
        for n, r in initial_ranges.items():  # the backbone as it was given: no half-learned state
            points[n].lo.fill_(float(r[0]))
            points[n].hi.fill_(float(r[1]))
        raise
    finally:
        for m in backbone.modules():
            m.__dict__.pop("weight_override", None)
            m.__dict__.pop("act_override", None)
    rec = Reconstruction(method=cfg.method, bits=str(b), ints=ints, ranges=current_ranges(backbone), units=stats,
                         settings={**cfg.settings(), "images": sum(len(x) for x in batches)},
                         seconds=time.perf_counter() - t0,
                         bit_config=b.config.as_dict() if isinstance(b, MixedBits) else None)
    for n, r in initial_ranges.items():  # leave the calibrated ranges; the result carries its own
        points[n].lo.fill_(float(r[0]))
        points[n].hi.fill_(float(r[1]))
    return rec
