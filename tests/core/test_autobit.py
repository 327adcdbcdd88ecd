"""Per-layer bit configurations (mixed precision) and autobit (docs/decisions/020): the map as a
value, its resolution, exact reload and ONNX of mixed packed files, Hutchinson's estimator, the
two solvers, and the evaluation option."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ssql_core.bitconfig import (
    BitConfig,
    MixedBits,
    configurable_layers,
    footprint,
    is_label,
    layer_table,
    parse_bit_config,
    resolve,
    uniform,
)
from ssql_core.bits import BitWidth, parse_bits
from ssql_core.config import EvalConfig
from ssql_core.errors import ConfigError
from ssql_core.export import export_checkpoints, load_quantized, save_quantized
from ssql_core.export.format import read_safetensors, size_report
from ssql_core.export.onnx_graph import compare_onnx, quant_point_agreement, read_onnx, write_onnx
from ssql_core.export.quantized import quantize_backbone
from ssql_core.mixed_precision.allocation import (
    InfeasibleBudget,
    Problem,
    Resource,
    solve_greedy,
    solve_milp,
)
from ssql_core.mixed_precision.autobit import AutobitConfig, check_budget
from ssql_core.mixed_precision.sensitivity import (
    hessian_costs,
    hutchinson_traces,
    perturbation,
    quant_error_costs,
)
from ssql_core.qnn import QConv2d, bind_context, weight_points
from tests.core.backbones import frozen_backbone

CPU = torch.device("cpu")


def backbone(name: str = "resnet18", seed: int = 0) -> nn.Module:
    return frozen_backbone(name, seed)


def calibrated(bb: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    ctx = bind_context(bb)
    with ctx.recording(), torch.no_grad():
        bb(x)
    return ctx


def mixed_map(bb: nn.Module, seed: int = 0) -> dict[str, str]:
    """Weights 2..8 at random per layer; activations 6 after a block's first conv, 4 elsewhere
    (so the convs meeting at a block's output point agree)."""
    g = torch.Generator().manual_seed(seed)
    return {n: f"{int(torch.randint(2, 9, (1,), generator=g))}w{6 if n.endswith('conv1') and '.' in n else 4}a"
            for n in configurable_layers(bb)}


# ---------------------------------------------------------------------------------------------
# the map as a value


def test_maps_parse_in_both_spellings_and_name_what_is_wrong() -> None:
    bb = backbone()
    layers = configurable_layers(bb)
    assert "conv1" not in layers and "layer1.0.conv1" in layers and "layer2.0.downsample.0" in layers
    as_strings = {n: "4w8a" for n in layers}
    as_objects = {n: {"w": 4, "a": 8} for n in layers}
    a, b = parse_bit_config(as_strings), parse_bit_config(as_objects)
    assert a == b and a.label == b.label and is_label(a.label) and len(a.label) <= 16
    assert parse_bit_config({**as_strings, "conv1": "8w8a"}) != a  # the stem named is another map, the same model:
    assert resolve({**as_strings, "conv1": "8w8a"}, bb).weights == resolve(a, bb).weights
    with pytest.raises(ValueError, match=r"layer 'layer9.0.conv1' is not a weight layer of this resnet18"):
        resolve({**as_strings, "layer9.0.conv1": "4w4a"}, bb)
    with pytest.raises(ValueError, match=r"misses 1 of the \d+ layers .*: layer4.1.conv2"):
        resolve({k: v for k, v in as_strings.items() if k != "layer4.1.conv2"}, bb)
    with pytest.raises(ValueError, match=r"'conv1' is the stem, fixed at 8-bit"):
        resolve({**as_strings, "conv1": "4w4a"}, bb)
    with pytest.raises(ValueError, match=r"'layer2.0.conv2' and 'layer2.0.downsample.0'|'layer2.0.downsample.0' and 'layer2.0.conv2'"):
        resolve({**as_strings, "layer2.0.downsample.0": "4w6a"}, bb)
    for bad, why in (({"layer1.0.conv1": "fp"}, "not a per-layer bit-width"), ({"layer1.0.conv1": {"w": 4}}, "exactly the keys"),
                     ({"layer1.0.conv1": {"w": 9, "a": 4}}, "w must be an integer from 2 to 8"), ({"x": "4w9a"}, "activation bits 9"),
                     ({}, "at least one layer")):
        with pytest.raises(ValueError, match=why):
            parse_bit_config(bad)
    with pytest.raises(ConfigError, match="bits"):
        EvalConfig(checkpoint="x", bits=["fp", {"layer1.0.conv1": "fp"}]).validate()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_a_uniform_map_computes_exactly_the_uniform_bit_width(name: str) -> None:
    bb = backbone(name)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ctx = calibrated(bb, x)
    mixed = resolve(uniform(bb, "3w5a"), bb)
    assert set(mixed.acts.values()) == {5, 8} and set(mixed.weights.values()) == {3, 8}
    with torch.no_grad(), ctx.quantized("3w5a"):
        want = bb(x)
    with torch.no_grad(), ctx.quantized(mixed):
        got = bb(x)
    assert torch.equal(want, got)


# ---------------------------------------------------------------------------------------------
# mixed packed files: exact reload, sizes, ONNX


def test_mixed_packed_file_reloads_exactly_and_its_onnx_codes_agree(tmp_path: Path) -> None:
    bb = backbone()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ctx = calibrated(bb, x)
    config = parse_bit_config(mixed_map(bb))
    mixed = resolve(config, bb)
    assert len(set(mixed.weights.values())) >= 4  # really mixed
    path = save_quantized(bb, config, tmp_path / "m.safetensors")
    manifest, _ = read_safetensors(path, "ssql-quantized-checkpoint")
    assert manifest["format_version"] == 2 and manifest["bits"] == config.label and manifest["bit_config"] == config.as_dict()
    assert manifest["weight_bits"] is None
    for name, w in mixed.weights.items():  # the per-entry bits of format 1 carry the widths
        assert manifest["weights"][f"backbone.{name}.weight"]["bits"] == w
    for name, a in mixed.acts.items():
        assert manifest["activations"][f"backbone.{name}"]["bits"] == a
    model = load_quantized(path)
    assert isinstance(model.bits, MixedBits) and model.bits.config == config
    with torch.no_grad(), ctx.quantized(mixed):
        want = bb(x)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    # the reported size is the file's tensors (the file adds its index and manifest)
    rep = size_report(path)
    fp = footprint(layer_table(bb, 16), mixed)
    assert abs(fp["model_bytes"] - (rep["weight_bytes_ideal"] + rep["fp_bytes"])) < 1
    smaller = footprint(layer_table(bb, 16), parse_bits("8w8a"))["model_bytes"]
    assert fp["model_bytes"] < smaller
    # a uniform file keeps format version 1
    assert read_safetensors(save_quantized(bb, "4w4a", tmp_path / "u.safetensors"), "ssql-quantized-checkpoint")[0]["format_version"] == 1
    onnx_path = write_onnx(tmp_path / "m.onnx", quantize_backbone(bb, config))
    _, onnx_manifest = read_onnx(onnx_path)
    assert onnx_manifest["bit_config"] == config.as_dict()
    assert {v["container"] for v in onnx_manifest["weights"].values()} == {"INT4", "INT8"}
    assert quant_point_agreement(onnx_path, x * 2)["mismatched"] == 0
    diff = compare_onnx(onnx_path, model, x)
    assert diff["samples_within_1e-5"] >= len(x) - 1


def test_reconstruction_runs_on_a_mixed_configuration() -> None:
    from ssql_core.ptq import ReconConfig, apply_reconstruction, clear_rounding, reconstruct

    bb = backbone()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    ctx = calibrated(bb, x)
    mixed = resolve(mixed_map(bb, 1), bb)
    rec = reconstruct(bb, ctx, [x], CPU, mixed, ReconConfig(method="adaround", iters=5, batch_size=8))
    assert rec.bits == str(mixed) and rec.bit_config == mixed.config.as_dict()
    for name, ints in rec.ints.items():
        lim = 2 ** (mixed.weights[name] - 1)
        assert -lim <= int(ints.min()) and int(ints.max()) < lim
    apply_reconstruction(bb, rec)
    try:
        quantize_backbone(bb, mixed)  # checks ints * scale == the in-memory weights, bit for bit
    finally:
        clear_rounding(bb)


# ---------------------------------------------------------------------------------------------
# sensitivity


class TinyNet(nn.Module):
    """Two quantizable convs: small enough for the exact Hessian."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = QConv2d(3, 2, 3, padding=1, bias=False)
        self.conv2 = QConv2d(2, 3, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))), 1).flatten(1)


def test_hutchinson_matches_the_exact_trace_within_its_own_standard_error() -> None:
    torch.manual_seed(0)
    net, head = TinyNet(), nn.Linear(3, 4)
    x, y = torch.randn(12, 3, 5, 5), torch.randint(0, 4, (12,))
    params = [net.conv1.weight, net.conv2.weight]
    loss = F.cross_entropy(head(net(x)), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    hess = torch.stack([torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params, retain_graph=True)])
                        for i in range(len(flat))]).double()
    sizes = [p.numel() for p in params]
    bounds = np.cumsum([0, *sizes])
    samples = 400
    est = hutchinson_traces(net, head, [(x, y)], CPU, samples=samples, seed=1, layers=["conv1", "conv2"])
    for i, name in enumerate(("conv1", "conv2")):
        lo, hi = bounds[i], bounds[i + 1]
        block = hess[lo:hi, lo:hi]
        exact = float(torch.diagonal(block).sum()) / sizes[i]
        # variance of one sample of v_l^T (H v)_l: 2 * sum of the block's squared off-diagonal
        # entries + the squared cross-layer entries of the layer's rows
        off = float(block.pow(2).sum() - torch.diagonal(block).pow(2).sum())
        cross = float(hess[lo:hi].pow(2).sum() - block.pow(2).sum())
        std = math.sqrt(2 * off + cross) / sizes[i] / math.sqrt(samples)
        assert abs(est[name] - exact) <= 5 * std + 1e-9, (name, est[name], exact, std)
        if name == "conv1":  # informative: the margin is far below the trace itself
            assert 5 * std < abs(exact) / 2


def test_quant_error_and_hessian_costs_fall_with_more_bits() -> None:
    bb = backbone()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    costs = quant_error_costs(bb, [x], CPU, [2, 4, 8])
    assert set(costs) == set(configurable_layers(bb))
    assert all(c[0] > c[1] > c[2] >= 0 for c in costs.values())
    traces = {n: 1.0 for n in costs}
    h = hessian_costs(traces, bb, [2, 4, 8])
    w = weight_points(bb)["layer1.0.conv1"].weight
    assert h["layer1.0.conv1"] == [perturbation(w, b) for b in (2, 4, 8)]
    assert hessian_costs({"layer1.0.conv1": -3.0}, bb, [2])["layer1.0.conv1"] == [0.0]  # negative estimates count as 0


# ---------------------------------------------------------------------------------------------
# allocation


def _instance(rng: np.random.Generator, layers: int, bops: bool) -> Problem:
    cands = [2, 3, 4, 6, 8]
    params = rng.integers(10, 5000, layers)
    cost = rng.lognormal(0, 2, layers)[:, None] * np.array([[4.0 ** -b for b in cands]]) * rng.uniform(0.5, 2, (layers, 1))
    size = (params[:, None] * np.array(cands)[None, :]).astype(np.int64)
    res = [Resource("budget_bits", size, int(rng.uniform(2.2, 7.5) * params.sum()))]
    if bops:
        use = (rng.integers(100, 10_000, layers)[:, None] * np.array(cands)[None, :] * 4).astype(np.int64)
        res.append(Resource("budget_bops", use, int(rng.uniform(0.4, 0.9) * use[:, -1].sum())))
    return Problem([f"l{i}" for i in range(layers)], cands, cost, res)


def test_milp_is_optimal_never_worse_than_greedy_and_both_meet_the_budget() -> None:
    rng = np.random.default_rng(0)
    greedy_worse = 0
    for t in range(60):
        p = _instance(rng, int(rng.integers(2, 6)), bops=t % 2 == 1)
        m, g = solve_milp(p), solve_greedy(p)
        for alloc in (m, g):
            idx = [p.candidates.index(alloc.bits[n]) for n in p.layers]
            for r in p.resources:
                assert sum(int(r.use[i, j]) for i, j in enumerate(idx)) <= r.budget
        brute = min(sum(p.cost[i, j] for i, j in enumerate(c)) for c in itertools.product(range(5), repeat=len(p.layers))
                    if all(sum(r.use[i, j] for i, j in enumerate(c)) <= r.budget for r in p.resources))
        assert m.objective == pytest.approx(brute, rel=1e-9)
        assert m.objective <= g.objective * (1 + 1e-9)
        greedy_worse += g.objective > m.objective * (1 + 1e-9)
    assert greedy_worse > 0  # the greedy is a heuristic: on some instances it is measurably worse
    for _ in range(10):  # larger instances: no brute force, the same guarantees
        p = _instance(rng, 40, bops=True)
        m, g = solve_milp(p), solve_greedy(p)
        assert m.objective <= g.objective * (1 + 1e-9) and m.status == "optimal"


def test_a_budget_no_configuration_meets_names_the_smallest_achievable() -> None:
    p = Problem(["a", "b"], [2, 4], np.ones((2, 2)), [Resource("budget_bits", np.array([[20, 40], [10, 20]]), 29, lambda t: t / 10)])
    for solve in (solve_milp, solve_greedy):
        with pytest.raises(InfeasibleBudget, match=r"smallest achievable is 3 \(every layer at 2 bits\)") as e:
            solve(p)
        assert e.value.smallest == 3
    table = layer_table(backbone(), 16)
    with pytest.raises(ConfigError, match=r"budget_bytes.*smallest achievable is (\d+)") as e:
        check_budget(table, AutobitConfig(budget_bytes=1000).validate())
    smallest = int(re.search(r"smallest achievable is (\d+)", str(e.value))[1])  # type: ignore[index]
    assert smallest == footprint(table, parse_bits("2w8a"))["model_bytes"]
    check_budget(table, AutobitConfig(budget_bytes=smallest).validate())  # exactly the smallest: met
    with pytest.raises(ConfigError, match=r"autobit.budget_bits: .*smallest achievable is 3"):
        AutobitConfig(budget_bits=2.5, candidates=(3, 4)).validate()
    with pytest.raises(ConfigError, match=r"autobit.budget_bops"):
        check_budget(table, AutobitConfig(budget_bits=4.0, budget_bops=10).validate())
    for bad, field in (({}, "autobit.budget_bits"), ({"budget_bits": 4, "budget_bytes": 10}, "autobit.budget_bytes"),
                       ({"budget_bits": 4, "solver": "cplex"}, "autobit.solver"), ({"budget_bits": 4, "candidates": [1, 4]}, "autobit.candidates"),
                       ({"budget_bits": 4, "sensitivity": "fisher"}, "autobit.sensitivity"), ({"budget_bits": 4, "budgetbits": 4}, "autobit.budgetbits")):
        with pytest.raises(ConfigError) as err:
            EvalConfig(checkpoint="x", autobit=bad).validate()
        assert err.value.field == field


# ---------------------------------------------------------------------------------------------
# the evaluation option


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ssql_core.config import PretrainConfig
    from ssql_core.train import pretrain

    work = tmp_path_factory.mktemp("run")
    pretrain(PretrainConfig(method="ssql", backbone="resnet18", dataset="synthetic", epochs=1, batch_size=16,
                            max_samples=32, image_size=8, width=0.0625, device="cpu", channels_last=False), work)
    return work


@pytest.mark.parametrize("sensitivity", ["hessian", "quant_error"])
def test_evaluation_chooses_evaluates_and_exports_a_configuration_within_budget(run: Path, tmp_path: Path, sensitivity: str) -> None:
    from torch.utils.data import DataLoader

    from ssql_core import data as ssql_data
    from ssql_core.evaluate import evaluate

    bb = backbone()
    given = mixed_map(bb, 2)
    rows = evaluate(EvalConfig(checkpoint=str(run / "last.pt"), bits=["fp", given], epochs=2, max_samples=64, calib_images=16,
                               device="cpu", batch_size=32, autobit={"budget_bits": 3.0, "sensitivity": sensitivity, "a_bits": 4,
                                                                     "images": 16, "samples": 2}), tmp_path)
    assert [r["bits"] for r in rows[:2]] == ["fp", parse_bit_config(given).label] and rows[1]["bit_config"] == parse_bit_config(given).as_dict()
    chosen = rows[2]
    assert is_label(chosen["bits"]) and chosen["autobit"]["sensitivity"] == sensitivity and chosen["autobit"]["status"] == "optimal"
    assert chosen["weight_bits_avg"] <= 3.0 and chosen["autobit"]["used"]["budget_bits"] == chosen["weight_bits_avg"]
    assert set(chosen["bit_config"]) == set(configurable_layers(bb)) and {v[-2:] for v in chosen["bit_config"].values()} == {"4a"}
    assert set(chosen["autobit"]["costs"]) == set(configurable_layers(bb))
    assert chosen["model_bytes"] < rows[0]["model_bytes"]
    if sensitivity == "hessian":
        assert chosen["autobit"]["probe"] == "the evaluation's fp head" and len(chosen["autobit"]["trace_per_param"]) == len(chosen["bit_config"])
    path = export_checkpoints(run / "last.pt", [chosen["bits"]], tmp_path / "x", heads=tmp_path / "heads.pt")[0]
    model = load_quantized(path)
    assert model.manifest["bit_config"] == chosen["bit_config"] and path.name == f"classifier-{chosen['bits']}.safetensors"
    test = ssql_data.load_split("synthetic", False, 8)
    correct = 0
    with torch.no_grad():
        for xb, yb in DataLoader(ssql_data.Transformed(test.data, ssql_data.test_transform(8, test.stats_key)), batch_size=256):
            correct += int((model(xb).argmax(1) == torch.as_tensor(yb)).sum())
    assert round(100.0 * correct / len(test.data), 3) == chosen["top1"]  # the exported classifier is the evaluated model


def test_evaluation_refuses_a_map_or_budget_the_backbone_cannot_take(run: Path) -> None:
    from ssql_core.evaluate import evaluate

    base = dict(checkpoint=str(run / "last.pt"), epochs=1, max_samples=32, calib_images=8, device="cpu")
    with pytest.raises(ConfigError, match="layer9.0.conv1") as e:
        evaluate(EvalConfig(**base, bits=[{"layer9.0.conv1": "4w4a"}]))
    assert e.value.field == "bits"
    with pytest.raises(ConfigError, match="smallest achievable") as e:
        evaluate(EvalConfig(**base, bits=["fp"], autobit={"budget_bytes": 100}))
    assert e.value.field == "autobit.budget_bytes"
    with pytest.raises(ValueError, match="names a per-layer configuration of an evaluation"):
        export_checkpoints(run / "last.pt", ["mixed-0123abcd"], run / "nothing")


def test_bit_config_value_type() -> None:
    c = BitConfig((("a", BitWidth(4, 8)),))
    assert str(c) == c.label and not c.is_fp and c.get("a") == BitWidth(4, 8) and c.as_dict() == {"a": "4w8a"}
