"""SimSiam-PACT: fixed-bit QAT pretraining whose checkpoint ssql_core.evaluate can still read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssql_core.config import EvalConfig, PretrainConfig
from ssql_core.errors import ConfigError
from ssql_core.evaluate import evaluate
from ssql_core.methods import METHODS
from ssql_core.models import build_backbone
from ssql_core.train import load_pretrained, pretrain


def cfg(**kw: object) -> PretrainConfig:
    base = dict(method="simsiam_pact", bits="4w4a", dataset="synthetic", epochs=1, batch_size=64,
                width=0.0625, image_size=16, max_samples=128, channels_last=False, device="cpu")
    return PretrainConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_registered_and_needs_fixed_bits() -> None:
    assert "simsiam_pact" in METHODS
    for bad in (None, "fp"):
        with pytest.raises(ConfigError) as e:
            cfg(bits=bad).validate()
        assert e.value.field == "bits"


def test_pretrain_learns_clips_and_evaluates(tmp_path: Path) -> None:
    r = pretrain(cfg(), tmp_path)
    assert r["steps"] == 2 and r["final_loss"] is not None
    c, method = load_pretrained(tmp_path / "last.pt")
    state = method.state_dict()
    alphas = {k: v for k, v in state.items() if k.startswith("pact.") and k.endswith("alpha")}
    assert alphas and bool(state["pact_initialized"])
    assert all(torch.isfinite(v) and v > 0 for v in alphas.values())
    assert any(abs(v.item() - 10.0) > 1e-3 for v in alphas.values())  # initialised from data
    plain = build_backbone("resnet18", "cifar", 0.0625).state_dict()
    assert set(torch.load(tmp_path / "backbone.pt", weights_only=True)) == set(plain)
    rows = evaluate(EvalConfig(checkpoint=str(tmp_path / "last.pt"), bits=["4w4a", "2w4a"], epochs=2, device="cpu"))
    assert [row["bits"] for row in rows] == ["4w4a", "2w4a"]
    assert all(0.0 <= row["top1"] <= 100.0 for row in rows)
