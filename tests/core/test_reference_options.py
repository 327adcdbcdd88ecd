"""The reference implementation's quantizer behaviours, as options: each one's effect shown."""

from __future__ import annotations

import pytest
import torch

from ssql_core.config import PretrainConfig
from ssql_core.errors import ConfigError
from ssql_core.methods import build_method
from ssql_core.models import build_backbone
from ssql_core.quant import quantize_activation, quantize_weight, weight_scale, weight_to_int


def test_attached_scale_adds_gradient_only_through_the_scale() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 4, 3, 3)
    g_out = torch.randn_like(w)
    grads = {}
    for mode in ("detached", "attached"):
        x = w.clone().requires_grad_(True)
        quantize_weight(x, 2, scale_grad=mode).backward(g_out)
        grads[mode] = x.grad
    diff = (grads["attached"] - grads["detached"]).reshape(8, -1)
    # values are identical; gradients differ exactly at each channel's largest |w| (the scale's argmax)
    assert torch.equal(quantize_weight(w, 2, scale_grad="attached"), quantize_weight(w, 2))
    argmax = w.reshape(8, -1).abs().argmax(1)
    mask = torch.zeros_like(diff, dtype=torch.bool)
    mask[torch.arange(8), argmax] = True
    assert diff[~mask].abs().max() < 1e-6  # (x * (1/s)) * s is 1 up to float rounding
    assert (diff[mask].abs() > 1e-4).all()
    # d out / d s summed over the channel, carried to the argmax through s = max|w| / 1.5
    s = weight_scale(w, 2)
    v = w * (1.0 / s)  # the default rounding's spelling: the argmax sits on a .5 tie
    q = torch.round(v).clamp(-2, 1)
    ds = torch.where((torch.round(v) >= -2) & (torch.round(v) <= 1), q - v, q)
    expected = (g_out * ds).reshape(8, -1).sum(1) / 1.5 * torch.sign(w.reshape(8, -1)[torch.arange(8), argmax])
    torch.testing.assert_close(diff[mask], expected, rtol=1e-4, atol=1e-5)


def test_divide_rounding_is_x_over_s_and_differs_at_ties() -> None:
    torch.manual_seed(1)
    w = torch.randn(512, 64)
    s = weight_scale(w, 4)
    div = quantize_weight(w, 4, rounding="divide")
    rec = quantize_weight(w, 4)
    torch.testing.assert_close(div, torch.round(w / s).clamp(-8, 7) * s, rtol=0, atol=0)
    torch.testing.assert_close(rec, torch.round(w * (1.0 / s)).clamp(-8, 7) * s, rtol=0, atol=0)
    changed = (div != rec).any(1).float().mean().item()
    assert 0.0 < changed < 0.5  # only channels whose tie rounds the other way
    ints_div, _ = weight_to_int(w, 4, rounding="divide")
    torch.testing.assert_close(ints_div.float() * s, div, rtol=0, atol=0)
    x = torch.rand(10000) * 3
    torch.testing.assert_close(quantize_activation(x, 4, 0.0, 3.0, rounding="divide"),
                               torch.round(x / (3.0 / 15)).clamp(0, 15) * (3.0 / 15))


def test_pytorch_init_matches_the_reference_statistics() -> None:
    torch.manual_seed(0)
    tv = build_backbone("resnet18", "cifar", 1.0, "torchvision").layer1[0].conv1.weight
    pt = build_backbone("resnet18", "cifar", 1.0, "pytorch").layer1[0].conv1.weight
    assert abs(tv.std().item() - (2 / (64 * 9)) ** 0.5) < 0.003  # kaiming-normal fan_out: 0.059
    assert abs(pt.std().item() - 1 / (3 * 64 * 9) ** 0.5) < 0.002  # kaiming-uniform a=sqrt(5): 0.024


def test_preset_sets_all_three_and_explicit_fields_win() -> None:
    ours = PretrainConfig().validate()
    assert (ours.weight_scale_grad, ours.rounding, ours.init) == ("detached", "reciprocal", "torchvision")
    ref = PretrainConfig(preset="reference").validate()
    assert (ref.weight_scale_grad, ref.rounding, ref.init) == ("attached", "divide", "pytorch")
    mixed = PretrainConfig(preset="reference", rounding="reciprocal").validate()
    assert (mixed.weight_scale_grad, mixed.rounding) == ("attached", "reciprocal")
    d = ref.to_dict()
    assert d["preset"] == "reference" and d["rounding"] == "divide"
    assert PretrainConfig.from_dict(d).validate().to_dict() == d
    for field, bad in (("preset", "paper"), ("rounding", "floor"), ("weight_scale_grad", "yes"), ("init", "xavier")):
        with pytest.raises(ConfigError) as e:
            PretrainConfig(**{field: bad}).validate()
        assert e.value.field == field


def test_reference_preset_reaches_the_method_and_trains() -> None:
    torch.manual_seed(0)
    cfg = PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16, batch_size=8, preset="reference").validate()
    m = build_method(cfg)
    assert (m.qctx.rounding, m.qctx.weight_scale_grad) == ("divide", "attached")
    x1, x2 = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    out = m.training_step(x1, x2, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# -- the reference's data, schedule and evaluation behaviours (issue 17) -----------------------
def test_reference_preset_sets_the_training_behaviours_and_old_checkpoints_keep_ours(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ssql_core import checkpoint as ckpt
    from ssql_core.train import load_pretrained

    ours = PretrainConfig().validate()
    assert (ours.normalization, ours.drop_last, ours.lr_step) == ("standard", True, "step")
    ref = PretrainConfig(preset="reference").validate()
    assert (ref.normalization, ref.drop_last, ref.lr_step) == ("reference", False, "epoch")
    assert PretrainConfig(preset="reference", drop_last=True).validate().drop_last is True
    for field, bad in (("normalization", "imagenet"), ("drop_last", "no"), ("drop_last", 0), ("lr_step", "batch")):
        with pytest.raises(ConfigError) as e:
            PretrainConfig(**{field: bad}).validate()
        assert e.value.field == field
    # a checkpoint written before these fields existed was trained with ours, even under the preset
    cfg = PretrainConfig(method="simsiam", dataset="synthetic", width=0.0625, image_size=16, preset="reference").validate()
    d = cfg.to_dict()
    for k in ("normalization", "drop_last", "lr_step"):
        del d[k]
    ckpt.save_atomic({"kind": "pretrain", "format_version": ckpt.FORMAT_VERSION, "config": d,
                      "model": build_method(cfg).state_dict()}, tmp_path / "last.pt")
    old, _ = load_pretrained(tmp_path / "last.pt")
    assert (old.normalization, old.drop_last, old.lr_step, old.rounding) == ("standard", True, "step", "divide")


def test_epoch_batches_keep_the_last_partial_batch_only_when_asked() -> None:
    from ssql_core.train import epoch_batches

    dropped = epoch_batches(10, 4, 0, 0)
    kept = epoch_batches(10, 4, 0, 0, drop_last=False)
    assert [len(b) for b in dropped] == [4, 4] and [len(b) for b in kept] == [4, 4, 2]
    assert sorted(i for b in kept for i in b) == list(range(10)) and kept[:2] == dropped
    assert [len(b) for b in epoch_batches(9, 4, 0, 0, drop_last=False)] == [4, 4]  # one image: BatchNorm cannot train on it
    # two devices: 5 left over -> 4 (2 per device); 3 left over -> 2, one per device: dropped
    assert [len(b) for b in epoch_batches(13, 4, 0, 0, drop_last=False, multiple=2)] == [4, 4, 4]
    assert [len(b) for b in epoch_batches(11, 4, 0, 0, drop_last=False, multiple=2)] == [4, 4]


def test_lr_per_epoch_is_constant_within_an_epoch_and_drop_last_adds_the_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ssql_core.hooks import Hooks
    from ssql_core.train import cosine_lr, pretrain

    class Rec(Hooks):
        every_n_steps = 1

        def __init__(self) -> None:
            self.events: list = []

        def on_progress(self, p) -> None:  # type: ignore[no-untyped-def]
            self.events.append(p)

    base = dict(method="simsiam", dataset="synthetic", width=0.0625, image_size=16, batch_size=48, max_samples=100, epochs=2,
                lr=0.05, channels_last=False, device="cpu")
    runs = {}
    for name, kw in {"ours": {}, "reference": {"lr_step": "epoch", "drop_last": False}}.items():
        rec = Rec()
        torch.manual_seed(0)
        pretrain(PretrainConfig(**base, **kw), tmp_path / name, rec)
        runs[name] = rec.events
    ours, ref = runs["ours"], runs["reference"]
    assert [e.step for e in ours] == [1, 2, 3, 4] and [e.step for e in ref] == [1, 2, 3, 4, 5, 6]  # 100 = 2 x 48 + 4
    # each step reports the lr it used: per epoch, it moves only at an epoch's start
    assert {round(e.lr, 8) for e in ref[:3]} == {0.05} and {round(e.lr, 8) for e in ref[3:]} == {round(cosine_lr(0.05, 1, 2), 8)}
    assert len({round(e.lr, 8) for e in ours}) == 4


def test_eval_presets_resolve_and_explicit_fields_win() -> None:
    from ssql_core.config import EvalConfig

    ours = EvalConfig(checkpoint="x").validate()
    assert (ours.calibration, ours.probe, ours.lr, ours.calib_images, ours.interpolation) == ("mse", "bn", 0.1, 128, "bilinear")
    assert ours.normalization is None and ours.rounding is None  # the checkpoint's own, resolved at evaluation
    paper = EvalConfig(checkpoint="x", preset="paper").validate()
    assert (paper.calibration, paper.probe, paper.lr, paper.calib_images) == ("minmax", "linear", 30.0, 128)
    ref = EvalConfig(checkpoint="x", preset="reference", lr=1.0).validate()
    assert (ref.calibration, ref.probe, ref.lr, ref.calib_images, ref.interpolation, ref.normalization) == (
        "reference", "linear", 1.0, 512, "bicubic", "reference")
    for field, bad in (("preset", "ours"), ("interpolation", "nearest"), ("normalization", "imagenet"), ("rounding", "floor")):
        with pytest.raises(ConfigError) as e:
            EvalConfig(checkpoint="x", **{field: bad}).validate()
        assert e.value.field == field


def test_reference_normalization_is_cifar10s_and_bicubic_resize_differs() -> None:
    from ssql_core.data import _STATS, stats_key_for, test_transform

    assert stats_key_for("cifar10", "reference") == "cifar10@reference"
    assert _STATS["cifar10@reference"][1] == (0.2023, 0.1994, 0.2010) and _STATS["cifar10"][1] == (0.2470, 0.2435, 0.2616)
    assert stats_key_for("digits", "reference") == "digits" and stats_key_for("cifar10", "standard") == "cifar10"
    img = (torch.arange(3 * 28 * 28) % 251).to(torch.uint8).reshape(3, 28, 28)
    lin, cub = test_transform(32, "cifar10", "bilinear")(img), test_transform(32, "cifar10", "bicubic")(img)
    assert lin.shape == cub.shape == (3, 32, 32) and not torch.equal(lin, cub)
    ref = test_transform(32, "cifar10@reference", "bilinear")(img)
    std_ratio = torch.tensor([0.2470, 0.2435, 0.2616]) / torch.tensor([0.2023, 0.1994, 0.2010])
    torch.testing.assert_close(ref, lin * std_ratio[:, None, None])
