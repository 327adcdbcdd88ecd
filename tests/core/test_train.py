"""The training loop: every method trains, runs resume exactly, progress, cancel, NaN, collapse."""

import pytest
import torch

from ssql_core.config import PretrainConfig
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.hooks import Hooks
from ssql_core.methods import METHODS
from ssql_core.train import load_pretrained, pretrain

TINY = dict(dataset="synthetic", width=0.0625, image_size=16, batch_size=16, max_samples=32, epochs=1, checkpoint_every_steps=3)


class Recorder(Hooks):
    every_n_steps = 1

    def __init__(self, stop_at: int | None = None) -> None:
        self.events = []
        self.stop_at = stop_at

    def on_progress(self, p):
        self.events.append(p)

    def should_stop(self):
        return self.stop_at is not None and self.events and self.events[-1].step >= self.stop_at


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_two_steps_without_nan(method, tmp_path):
    opts = {"queue_size": 32} if "moco" in method else {}
    bits = "4w4a" if getattr(METHODS[method], "needs_fixed_bits", False) else None
    rec = Recorder()
    summary = pretrain(PretrainConfig(method=method, method_options=opts, bits=bits, **TINY), tmp_path, rec)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["final_loss"]))
    assert [e.step for e in rec.events] == [1, 2] and rec.events[-1].fraction == 1.0
    assert 0 < rec.events[-1].metrics["z_std"] < 1
    assert (tmp_path / "backbone.pt").exists() and (tmp_path / "last.pt").exists()


def _weights(path):
    return torch.load(path / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("method,stop_at", [("ssql", 2), ("ssql", 3), ("ssql_byol", 3)])
def test_resume_gives_identical_weights(method, stop_at, tmp_path):
    cfg = dict(TINY, method=method, epochs=2)
    straight, resumed = tmp_path / "a", tmp_path / "b"
    pretrain(PretrainConfig(**cfg), straight)
    with pytest.raises(Cancelled):
        pretrain(PretrainConfig(**cfg), resumed, Recorder(stop_at=stop_at))
    # stop_at=2 is the epoch boundary (1 epoch + resume + 1 epoch); stop_at=3 resumes mid-epoch
    assert torch.load(resumed / "last.pt", weights_only=True)["global_step"] == (2 if stop_at == 2 else 3)
    pretrain(PretrainConfig(**cfg), resumed)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_different_run(tmp_path):
    pretrain(PretrainConfig(method="simsiam", **TINY), tmp_path)
    with pytest.raises(ConfigError) as e:
        pretrain(PretrainConfig(method="ssql", **TINY), tmp_path)
    assert e.value.field == "method"


def test_progress_fraction_rises_and_cancel_stops(tmp_path):
    rec = Recorder(stop_at=2)
    with pytest.raises(Cancelled):
        pretrain(PretrainConfig(method="simsiam", **dict(TINY, epochs=3)), tmp_path, rec)
    fr = [e.fraction for e in rec.events]
    assert fr == sorted(fr) and fr[-1] < 1 and len(fr) == 2
    assert rec.events[-1].images_per_s > 0 and rec.events[-1].lr > 0


def test_non_finite_loss_stops_with_clear_error(tmp_path, monkeypatch):
    from ssql_core.methods.simsiam import SimSiam

    real = SimSiam.training_step

    def poisoned(self, x1, x2, step):
        out = real(self, x1, x2, step)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SimSiam, "training_step", poisoned)
    with pytest.raises(NonFiniteLoss, match="lower the learning rate"):
        pretrain(PretrainConfig(method="simsiam", **TINY), tmp_path)


def test_load_pretrained_rebuilds_method(tmp_path):
    pretrain(PretrainConfig(method="ssql", **TINY), tmp_path)
    cfg, model = load_pretrained(tmp_path / "last.pt")
    assert cfg.method == "ssql" and model.backbone.feat_dim == 32


@pytest.mark.parametrize("field,value", [("method", "nope"), ("backbone", "vgg"), ("dataset", "mnist"), ("epochs", 0),
                                         ("w_bits", (1, 8)), ("a_bits", (5, 4)), ("bits", "9w4a"), ("width", 0.0),
                                         ("dataset", "imagefolder:../../etc")])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        PretrainConfig(**{field: value}).validate()
    assert e.value.field == field and e.value.reason


def test_bad_method_option_names_it():
    with pytest.raises(ConfigError) as e:
        PretrainConfig(method="mocov2", method_options={"queue_size": "big"}).validate()
    assert e.value.field == "method_options.queue_size"
