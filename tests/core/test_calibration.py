"""Activation calibration methods, the quantized-weights ablation and the BN probe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssql_core.calibration import calibrate_ranges, choose_range, collect, mse_range, zero_rounding
from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.errors import ConfigError
from ssql_core.evaluate import calibrate, evaluate, fold_probe, make_probe
from ssql_core.models import build_backbone
from ssql_core.qnn import act_points, bind_context
from ssql_core.quant import quantize_activation
from ssql_core.train import pretrain


def _net_and_images() -> tuple[torch.nn.Module, object, DataLoader]:
    torch.manual_seed(0)
    net = build_backbone("resnet18", "cifar", 0.0625).eval()
    ctx = bind_context(net)
    images = DataLoader(TensorDataset(torch.randn(64, 3, 16, 16), torch.zeros(64)), batch_size=16)
    return net, ctx, images


def test_minmax_equals_record_mode_and_others_shrink_the_range() -> None:
    net, ctx, images = _net_and_images()
    calibrate(net, ctx, images, torch.device("cpu"))
    recorded = {n: (float(p.lo), float(p.hi)) for n, p in act_points(net).items()}
    calibrate_ranges(net, ctx, images, torch.device("cpu"), "4w4a", "minmax")
    assert {n: (float(p.lo), float(p.hi)) for n, p in act_points(net).items()} == recorded
    for method in ("percentile", "mse"):
        calibrate_ranges(net, ctx, images, torch.device("cpu"), "4w4a", method, percentile=99.0)
        for n, p in act_points(net).items():
            assert recorded[n][0] <= float(p.lo) < float(p.hi) <= recorded[n][1] + 1e-6, (method, n)
        assert any(float(p.hi) < recorded[n][1] for n, p in act_points(net).items())


def test_percentile_and_mse_on_a_known_distribution() -> None:
    torch.manual_seed(0)
    v = torch.cat([torch.rand(100000), torch.tensor([50.0])])  # one outlier
    from ssql_core.calibration import PointStats

    stats = PointStats(lo=0.0, hi=50.0, samples=[v])
    lo, hi = choose_range(stats, "percentile", 4, 99.0)
    assert lo == pytest.approx(0.01, abs=0.005) and hi == pytest.approx(0.99, abs=0.005)
    lo, hi = mse_range(v, 0.0, 50.0, 4)
    err = lambda h: (quantize_activation(v, 4, 0.0, h) - v).pow(2).mean().item()  # noqa: E731
    assert hi < 5.0 and err(hi) < err(50.0) / 10


def test_quantized_weights_change_the_recorded_ranges() -> None:
    net, ctx, images = _net_and_images()
    fp, _ = collect(net, ctx, images, torch.device("cpu"), None, keep_samples=False)
    from ssql_core.bits import parse_bits

    q, _ = collect(net, ctx, images, torch.device("cpu"), parse_bits("2w4a"), keep_samples=False)
    assert any(fp[n].hi != q[n].hi for n in fp if n != "act_stem")
    assert ctx.mode.value == "fp" and ctx.quant_a  # the context is left as it was
    stats = zero_rounding(net, ctx, images, torch.device("cpu"), "4w4a")
    assert set(stats) == set(act_points(net)) and all(0 <= s["nonzero_to_zero"] <= 1 for s in stats.values())


def test_bn_probe_folds_into_one_linear_layer() -> None:
    torch.manual_seed(0)
    probe = make_probe(16, 3, "bn")
    probe.train()
    probe(torch.randn(256, 16) * 5 + 2)
    probe.eval()
    x = torch.randn(32, 16) * 5 + 2
    torch.testing.assert_close(fold_probe(probe)(x), probe(x), rtol=1e-4, atol=1e-4)


def test_evaluate_names_calibration_and_probe_in_every_row(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrain(PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16, batch_size=16, max_samples=64,
                            epochs=1, device="cpu"), tmp_path)
    for calibration in ("reference", "mse"):
        rows = evaluate(EvalConfig(checkpoint=str(tmp_path / "last.pt"), bits=["fp", "4w4a"], epochs=3, max_samples=64,
                                   calibration=calibration, probe="bn", lr=0.1, calib_images=32, calib_weights="quantized"))
        for r in rows:
            assert (r["calibration"], r["probe"], r["calib_weights"]) == (calibration, "bn", "quantized")
            assert len(r["loss_curve"]) == 3 and r["train_loss"] == r["loss_curve"][-1]
        assert rows[1]["calib_images"] == 32
    for field, bad in (("calibration", "kl"), ("probe", "mlp"), ("calib_weights", "int"), ("calib_percentile", 30.0),
                       ("weight_decay", float("nan")), ("momentum", 5.0), ("lr_milestones", [0.5, float("inf")])):
        with pytest.raises(ConfigError) as e:
            EvalConfig(checkpoint="x", **{field: bad}).validate()
        assert e.value.field == field
