"""Quantization-aware fine-tuning: it beats the PTQ + linear start, resumes exactly after a kill,
transfers to a dataset with another number of classes, stops on NaN and on cancel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssql_core.config import PretrainConfig
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.export import load_quantized
from ssql_core.finetune import (
    FINETUNED,
    LAST,
    FinetuneConfig,
    export_finetuned,
    finetune,
    load_finetuned,
)
from ssql_core.hooks import Hooks, Progress
from ssql_core.train import pretrain


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("pretrain")
    pretrain(PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16, batch_size=32, max_samples=128,
                            epochs=1, device="cpu"), wd)
    return wd / "last.pt"


def small(source: Path, **kw: object) -> FinetuneConfig:
    base = dict(checkpoint=str(source), bits="4w4a", epochs=2, batch_size=16, lr=0.05, max_samples=64, calib_images=32,
                baseline_epochs=0, head_init="random", device="cpu", checkpoint_every_steps=3)
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_finetuning_beats_the_ptq_linear_start_and_exports(source: Path, tmp_path: Path) -> None:
    r = finetune(small(source, epochs=6, batch_size=32, max_samples=256, head_lr=0.5, baseline_epochs=10, calib_images=64,
                       head_init="random"), tmp_path)
    assert r["top1"] > r["ptq_linear_top1"] + 5, r
    assert r["top1"] > r["start_top1"]
    assert [c["epoch"] for c in r["curve"]] == list(range(1, 7)) and r["curve"][-1]["test_top1"] == r["top1"]
    packed = load_quantized(export_finetuned(tmp_path / FINETUNED, tmp_path / "classifier-4w4a.safetensors"))
    _, model = load_finetuned(tmp_path / FINETUNED)
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=1e-5, atol=1e-5)
    assert packed.manifest["source"]["kind"] == "finetuned"


class _KillAt(Hooks):
    every_n_steps = 1

    def __init__(self, step: int) -> None:
        self.step = step

    def on_progress(self, progress: Progress) -> None:
        if progress.step == self.step:
            raise KeyboardInterrupt("killed")


@pytest.mark.parametrize(("bits", "quantizer", "act_ranges"), [("4w4a", "psq", "frozen"), ("3w4a", "lsq", "update"), ("fp", "psq", "frozen")])
def test_kill_and_resume_gives_the_uninterrupted_weights(source: Path, tmp_path: Path, bits: str, quantizer: str, act_ranges: str) -> None:
    cfg = small(source, bits=bits, quantizer=quantizer, act_ranges=act_ranges)
    straight = finetune(cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, tmp_path / "b", _KillAt(5))  # the last checkpoint was written at step 3
    assert (tmp_path / "b" / LAST).exists() and not (tmp_path / "b" / FINETUNED).exists()
    resumed = finetune(cfg, tmp_path / "b")
    assert resumed["top1"] == straight["top1"] and resumed["steps"] == straight["steps"] == 8
    a, b = torch.load(tmp_path / "a" / FINETUNED, weights_only=True), torch.load(tmp_path / "b" / FINETUNED, weights_only=True)
    for part in ("backbone", "head", "quantizers"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_frozen_ranges_stay_and_update_moves_them(source: Path, tmp_path: Path) -> None:
    def ranges(wd: Path) -> list[float]:
        q = torch.load(wd / FINETUNED, weights_only=True)["quantizers"]
        return [float(v) for k, v in sorted(q.items()) if k.endswith(".hi")]

    finetune(small(source, epochs=1), tmp_path / "frozen")
    finetune(small(source, epochs=1, act_ranges="update"), tmp_path / "update")
    calib_only = small(source, epochs=1)
    # frozen = the calibration's ranges: a second run that stops before any step has the same
    from ssql_core.finetune import _Finetuner

    t = _Finetuner(calib_only.validate(), tmp_path / "c", Hooks())
    t.model = t.build_model()
    t.calibrate()
    calibrated = sorted((k, float(v)) for k, v in t.model.quantizers.state_dict().items() if k.endswith(".hi"))
    assert ranges(tmp_path / "frozen") == [v for _, v in calibrated]
    assert ranges(tmp_path / "update") != [v for _, v in calibrated]


def test_transfer_takes_the_number_of_classes_from_the_dataset(source: Path, tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(3):
            d = tmp_path / "data" / "three" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray((rng.random((20, 20, 3)) * 80 + c * 80).astype(np.uint8)).save(d / f"{i}.png")
    r = finetune(small(source, dataset="imagefolder:three", data_root=str(tmp_path / "data"), epochs=1, batch_size=6), tmp_path / "wd")
    assert r["num_classes"] == 3 and r["dataset"] == "imagefolder:three" and r["pretrain_dataset"] == "synthetic"
    assert torch.load(tmp_path / "wd" / FINETUNED, weights_only=True)["head"]["weight"].shape[0] == 3


def test_nan_and_cancel_stop_the_run(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import ssql_core.finetune as ft

    calls = {"n": 0}

    def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, y)
        return loss * float("nan") if calls["n"] == 3 else loss  # the third step's loss is NaN

    monkeypatch.setattr(ft, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    with pytest.raises(NonFiniteLoss, match="lower the learning rate"):
        finetune(small(source), tmp_path / "nan")
    assert calls["n"] == 3
    monkeypatch.undo()

    class Stop(Hooks):
        every_n_steps = 1

        def should_stop(self) -> bool:
            return True

    with pytest.raises(Cancelled):
        finetune(small(source), tmp_path / "cancel", Stop())


def test_probe_head_init_starts_where_the_ptq_linear_baseline_ends(source: Path, tmp_path: Path) -> None:
    # the starting model is the baseline's: the same PSQ min-max ranges on the same calibration
    # images and the baseline's own (BN-folded) probe as the head
    r = finetune(small(source, epochs=1, max_samples=128, baseline_epochs=5, head_init="probe"), tmp_path)
    assert r["head_init"] == "probe" and abs(r["start_top1"] - r["ptq_linear_top1"]) < 1e-6, r
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(checkpoint=str(source), head_init="probe", baseline_epochs=0).validate()
    assert e.value.field == "head_init"


@pytest.mark.parametrize(("field", "bad"), [("bits", "9w4a"), ("quantizer", "int8"), ("act_ranges", "ema"), ("lr", float("nan")),
                                            ("crop_scale", [0.9, 0.1]), ("epochs", 0), ("checkpoint", ""), ("head_init", "zeros")])
def test_bad_config_names_the_field(source: Path, field: str, bad: object) -> None:
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(**{"checkpoint": str(source), field: bad}).validate()  # type: ignore[arg-type]
    assert e.value.field == field
