"""devices > 1: two gloo ranks on the CPU (ssql_core.distributed). Ranks hold identical parameters
after every step and draw the same bit pairs; cancel stops both; a killed rank fails the attempt,
and the next attempt resumes to the weights of an uninterrupted run."""

import json
import multiprocessing
import os
import signal

import pytest
import torch

from ssql_core.config import PretrainConfig
from ssql_core.distributed import RankFailed, _outcome, check_devices
from ssql_core.errors import Cancelled, ConfigError, NonFiniteLoss
from ssql_core.hooks import Hooks
from ssql_core.sampler import BitSampler
from ssql_core.train import pretrain

# 32 images, global batch 16 (8 per rank): 2 steps per epoch, 4 steps; one torch thread per rank
TWO = dict(method="ssql", dataset="synthetic", width=0.0625, image_size=16, batch_size=16, max_samples=32, epochs=2,
           checkpoint_every_steps=2, devices=2, device="cpu", input_pipeline="device")


class Recorder(Hooks):
    every_n_steps = 1

    def __init__(self, stop_at=None, kill_rank_at=None):
        self.events, self.checkpoints = [], []
        self.stop_at, self.kill_rank_at = stop_at, kill_rank_at

    def on_progress(self, p):
        self.events.append(p)
        if self.kill_rank_at is not None and p.step == self.kill_rank_at:
            (rank1,) = [c for c in multiprocessing.active_children() if c.name == "ssql-rank1"]
            os.kill(rank1.pid, signal.SIGKILL)

    def on_checkpoint(self, path, epoch, step):
        self.checkpoints.append(step)

    def should_stop(self):
        return self.stop_at is not None and self.events[-1].step >= self.stop_at


def _weights(path):
    return torch.load(path / "last.pt", weights_only=True)["model"]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 2-rank run, traced (every rank's bit pair and parameter digest per step)."""
    root = tmp_path_factory.mktemp("straight")
    trace = root / "trace"
    trace.mkdir()
    os.environ["SSQL_TRACE_DIR"] = str(trace)  # the ranks inherit it
    try:
        rec = Recorder()
        summary = pretrain(PretrainConfig(**TWO), root / "run", rec)
    finally:
        del os.environ["SSQL_TRACE_DIR"]
    return root / "run", trace, summary, rec


def test_two_ranks_hold_identical_parameters_and_bits_every_step(straight):
    workdir, trace, summary, rec = straight
    assert summary["steps"] == 4 and summary["devices"] == 2 and summary["input_pipeline"] == "device"
    rows = [[json.loads(line) for line in (trace / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]] == [0, 1, 2, 3]
    sampler = BitSampler(0, (2, 8), (4, 8))  # the default seed and ranges
    for a, b in zip(*rows, strict=True):
        assert a["params"] == b["params"], a["step"]
        assert a["bits"] == b["bits"] == str(sampler.sample(a["step"]))
    assert len({r["params"] for r in rows[0]}) == 4  # the parameters did move
    # rank 0 alone reports and writes: one progress event per step, checkpoints at 2 and 4
    assert [e.step for e in rec.events] == [1, 2, 3, 4] and rec.checkpoints == [2, 4]
    assert rec.events[-1].images_per_s > 0 and rec.events[-1].metrics["w_bits"] >= 2
    assert (workdir / "backbone.pt").exists()


def test_cancel_stops_every_rank_and_the_run_resumes_exactly(straight, tmp_path):
    with pytest.raises(Cancelled):
        pretrain(PretrainConfig(**TWO), tmp_path, Recorder(stop_at=2))
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("ssql-rank")]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["global_step"] == 2
    pretrain(PretrainConfig(**TWO), tmp_path)
    _assert_same(_weights(straight[0]), _weights(tmp_path))


def test_a_killed_rank_fails_the_attempt_and_the_next_attempt_resumes(straight, tmp_path):
    cfg = dict(TWO, input_pipeline="loader")  # the loader path, sharded the same way
    with pytest.raises(RankFailed, match="rank 1 was killed by signal 9"):
        pretrain(PretrainConfig(**cfg), tmp_path, Recorder(kill_rank_at=3))
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("ssql-rank")]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["global_step"] == 2
    summary = pretrain(PretrainConfig(**cfg), tmp_path)
    assert summary["steps"] == 4 and summary["input_pipeline"] == "loader"
    from worker.runner import classify_crash

    assert classify_crash(RankFailed("rank 1 was killed"), {"kind": "pretrain"})["retryable"] is True


def test_devices_validation_and_outcomes():
    with pytest.raises(ConfigError) as e:
        PretrainConfig(devices=3, batch_size=16).validate()
    assert e.value.field == "devices"
    with pytest.raises(ConfigError) as e:
        PretrainConfig(devices=0).validate()
    assert e.value.field == "devices"
    with pytest.raises(ConfigError) as e:
        check_devices(PretrainConfig(devices=2, device="cpu", sync_bn=True, batch_size=16).validate())
    assert e.value.field == "sync_bn"
    assert _outcome({0: ("ok", {"steps": 1}), 1: ("ok", {"steps": 1})}, 2) == {"steps": 1}
    with pytest.raises(Cancelled):
        _outcome({0: ("cancelled", "stop"), 1: ("cancelled", "stop")}, 2)
    with pytest.raises(NonFiniteLoss):
        _outcome({0: ("non_finite", "nan"), 1: ("died", -9)}, 2)
    with pytest.raises(ConfigError):
        _outcome({0: ("config", "dataset", "no such"), 1: ("config", "dataset", "no such")}, 2)
    with pytest.raises(RankFailed, match="rank 1 was killed by signal 9"):
        _outcome({0: ("error", "gloo: connection closed"), 1: ("died", -9)}, 2)


def test_the_server_limits_devices(tmp_path):
    from api.errors import FieldError
    from api.specs import pretrain_spec
    from persistence.settings import Settings

    settings = Settings(home=tmp_path, max_devices=4)
    spec = pretrain_spec({"kind": "pretrain", "dataset": "synthetic", "devices": 4, "batch_size": 64, "sync_bn": True}, settings)
    assert spec["config"]["devices"] == 4 and spec["config"]["sync_bn"] is True
    with pytest.raises(FieldError) as e:  # a 422 naming the field
        pretrain_spec({"kind": "pretrain", "dataset": "synthetic", "devices": 8, "batch_size": 64}, settings)
    assert e.value.loc == ("body", "devices") and "at most 4" in e.value.reason
