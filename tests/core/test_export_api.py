"""export_checkpoint from a real (tiny) pretrain run and its evaluation's heads.pt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ssql_core import data as ssql_data
from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.evaluate import evaluate
from ssql_core.export import CalibrationSpec, export_checkpoint, load_quantized
from ssql_core.train import pretrain


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    work = tmp_path_factory.mktemp("run")
    cfg = PretrainConfig(method="ssql", backbone="resnet18", dataset="synthetic", epochs=1, batch_size=32,
                         max_samples=64, image_size=16, width=0.0625, device="cpu", channels_last=False)
    pretrain(cfg, work)
    rows = evaluate(EvalConfig(checkpoint=str(work / "last.pt"), bits=["fp", "4w4a", "2w8a"], epochs=3, max_samples=96,
                               calib_images=40, seed=3, device="cpu", batch_size=64), work)
    return work, rows


@torch.no_grad()
def _top1(model: torch.nn.Module) -> float:
    test = ssql_data.load_split("synthetic", False, 16)
    loader = DataLoader(ssql_data.Transformed(test.data, ssql_data.test_transform(16, test.stats_key)), batch_size=128)
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == torch.as_tensor(y)).sum().item()
        total += len(y)
    return 100.0 * correct / total


@pytest.mark.parametrize("bits", ["fp", "4w4a", "2w8a"])
def test_classifier_reproduces_evaluation_top1(run: tuple[Path, list[dict]], bits: str, tmp_path: Path) -> None:
    work, rows = run
    path = export_checkpoint(work / "last.pt", bits, tmp_path, heads=work / "heads.pt", source_job="job-42")
    assert path.name == f"classifier-{bits}.safetensors"
    model = load_quantized(path)
    row = next(r for r in rows if r["bits"] == bits)
    # the same calibration images as the evaluation (its seed, size, subset), so the same accuracy
    assert _top1(model) == pytest.approx(row["top1"], abs=1e-3)
    m = model.manifest
    assert m["source"]["job"] == "job-42" and m["source"]["method"] == "ssql"
    assert m["evaluation"]["row"]["top1"] == row["top1"]
    if bits != "fp":
        assert m["calibration"]["images"] == 40 and m["calibration"]["seed"] == 3 and m["calibration"]["max_samples"] == 96


def test_backbone_export_defaults_and_calibration_choices(run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    work, _ = run
    path = export_checkpoint(work / "last.pt", "3w5a", tmp_path)
    m = load_quantized(path).manifest
    assert path.name == "backbone-3w5a.safetensors" and m["kind"] == "backbone" and m["head"] is None
    assert m["calibration"] == {**m["calibration"], "source": "dataset", "dataset": "synthetic", "images": 128, "seed": 0}
    spec = export_checkpoint(work / "last.pt", "3w5a", tmp_path / "s", calib=CalibrationSpec(images=16, seed=5))
    assert load_quantized(spec).manifest["calibration"]["images"] == 16
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    own = export_checkpoint(work / "last.pt", "3w5a", tmp_path / "b", calib=lambda: iter(batches))
    cal = load_quantized(own).manifest["calibration"]
    assert cal == {"source": "caller-supplied batches", "images": 8, "method": "minmax", "weights": "fp"}


def test_bad_requests_refused(run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    work, _ = run
    with pytest.raises(ValueError, match="no head for 6w6a"):
        export_checkpoint(work / "last.pt", "6w6a", tmp_path, heads=work / "heads.pt")
    with pytest.raises(ValueError, match="fmt must be"):
        export_checkpoint(work / "last.pt", "4w4a", tmp_path, fmt="pickle")
    with pytest.raises(ValueError, match="invalid bit-width"):
        export_checkpoint(work / "last.pt", "9w4a", tmp_path)
    with pytest.raises(ValueError, match="not an evaluation's heads file"):
        export_checkpoint(work / "last.pt", "4w4a", tmp_path, heads=work / "last.pt")


def test_onnx_and_torchvision_formats(run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    import numpy as np

    from ssql_core.export.onnx_graph import onnx_session, read_onnx

    work, rows = run
    path = export_checkpoint(work / "last.pt", "4w4a", tmp_path, fmt="onnx", heads=work / "heads.pt", source_job="j")
    assert path.name == "classifier-4w4a.onnx"
    _, manifest = read_onnx(path)
    assert manifest["calibration"]["images"] == 40 and manifest["source"]["job"] == "j"
    sess = onnx_session(path, optimize=True)  # as a deployment would run it: ORT's QDQ fusions on
    test = ssql_data.load_split("synthetic", False, 16)
    loader = DataLoader(ssql_data.Transformed(test.data, ssql_data.test_transform(16, test.stats_key)), batch_size=256)
    correct = sum(int((np.argmax(sess.run(None, {"input": x.numpy()})[0], 1) == np.asarray(y)).sum()) for x, y in loader)
    row = next(r for r in rows if r["bits"] == "4w4a")
    assert 100.0 * correct / len(test.data) == pytest.approx(row["top1"], abs=100.0 * 2 / len(test.data))
    with pytest.raises(ValueError, match="width multiplier"):
        export_checkpoint(work / "last.pt", "fp", tmp_path, fmt="torchvision")
    with pytest.raises(ValueError, match="FP weights only"):
        export_checkpoint(work / "last.pt", "4w4a", tmp_path, fmt="torchvision")
    with pytest.raises(ValueError, match="ONNX files run in onnxruntime"):
        load_quantized(path)


def test_several_bit_widths_in_one_call_are_the_same_files(run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    from ssql_core.export import export_checkpoints

    work, _ = run
    many = export_checkpoints(work / "last.pt", ["fp", "4w4a", "2w8a"], tmp_path / "many", heads=work / "heads.pt", source_job="j")
    assert [p.name for p in many] == ["classifier-fp.safetensors", "classifier-4w4a.safetensors", "classifier-2w8a.safetensors"]
    one = export_checkpoint(work / "last.pt", "4w4a", tmp_path / "one", heads=work / "heads.pt", source_job="j")
    # same content (the hash covers manifest and every tensor; safetensors orders its header
    # metadata by a Rust HashMap, so raw bytes may differ)
    assert _sha(one) == _sha(many[1])
    assert "calibration" not in load_quantized(many[0]).manifest  # fp needs none


def _sha(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["sha256"]


@pytest.mark.parametrize("calibration", ["mse", "percentile", "reference"])
def test_classifier_with_another_calibration_reproduces_its_evaluation(run: tuple[Path, list[dict]], tmp_path: Path,
                                                                       calibration: str) -> None:
    """An evaluation calibrated by MSE / percentile / the reference batch exports files with its
    ranges: the classifier's accuracy is the evaluation's, and the manifest names the method."""
    work, _ = run
    ev = tmp_path / "ev"
    rows = evaluate(EvalConfig(checkpoint=str(work / "last.pt"), bits=["4w4a", "2w8a"], epochs=3, max_samples=96, calib_images=40,
                               seed=3, device="cpu", batch_size=64, calibration=calibration, calib_percentile=99.0), ev)
    paths = [export_checkpoint(work / "last.pt", b, tmp_path, heads=ev / "heads.pt") for b in ("4w4a", "2w8a")]
    for path, row in zip(paths, rows, strict=True):
        model = load_quantized(path)
        assert _top1(model) == pytest.approx(row["top1"], abs=1e-3)
        assert model.manifest["calibration"]["method"] == calibration == row["calibration"]
        if calibration == "mse":
            assert model.manifest["calibration"]["bits"] == row["bits"]  # calibrated per file


def test_export_calibration_override_and_bad_method(run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    from ssql_core.export import export_checkpoints

    work, _ = run
    (p,) = export_checkpoints(work / "last.pt", ["4w4a"], tmp_path, calibration="percentile", calib_percentile=99.5)
    cal = load_quantized(p).manifest["calibration"]
    assert (cal["method"], cal["percentile"], cal["weights"]) == ("percentile", 99.5, "fp")
    with pytest.raises(ValueError, match="calibration method"):
        CalibrationSpec(method="kl")


def test_classifier_of_a_divide_rounding_evaluation_is_the_evaluated_model(run: tuple[Path, list[dict]], tmp_path: Path) -> None:
    """An evaluation with the reference's ``rounding="divide"`` (x / s; the "reference" preset's)
    exports that model: its integers and activation codes, not the ``x * (1/s)`` ones. Before the
    exporter followed the evaluation's rounding, features differed by up to a third of their scale."""
    from ssql_core.export.api import load_heads
    from ssql_core.export.calibration import run_calibration
    from ssql_core.export.onnx_graph import forced_code_agreement
    from ssql_core.qnn import QuantContext, bind_context
    from ssql_core.train import load_pretrained

    work, _ = run
    ev = tmp_path / "ev"
    (row,) = evaluate(EvalConfig(checkpoint=str(work / "last.pt"), bits=["3w4a"], epochs=2, max_samples=96, calib_images=40,
                                 seed=3, device="cpu", batch_size=64, rounding="divide"), ev)
    assert row["rounding"] == "divide"
    path = export_checkpoint(work / "last.pt", "3w4a", tmp_path, heads=ev / "heads.pt")
    model = load_quantized(path)
    assert model.manifest["rounding"] == "divide" and "x / s" in model.manifest["quantizer"]["activations"]
    assert _top1(model) == pytest.approx(row["top1"], abs=1e-3)
    # the evaluated model, rebuilt: the run's backbone, the evaluation's calibration, x / s
    pcfg, method = load_pretrained(str(work / "last.pt"))
    backbone = method.backbone.eval()
    ctx = bind_context(backbone, QuantContext(rounding="divide"))
    _, ecfg = load_heads(ev / "heads.pt", pcfg)
    run_calibration(backbone, ctx, CalibrationSpec.from_eval(ecfg), pcfg, torch.device("cpu"), "3w4a")
    x = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ctx.quantized("3w4a"):
        evaluated = backbone(x)
    with torch.no_grad():
        assert torch.equal(model.backbone(x), evaluated)
    onnx_path = export_checkpoint(work / "last.pt", "3w4a", tmp_path, fmt="onnx", heads=ev / "heads.pt")
    assert forced_code_agreement(onnx_path, model, x)["ok"]
