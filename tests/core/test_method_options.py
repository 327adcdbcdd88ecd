"""Method options: every option has a type and a range, checked before any worker runs it."""

from __future__ import annotations

import math

import pytest
import torch

from ssql_core.config import PretrainConfig
from ssql_core.errors import ConfigError
from ssql_core.methods import METHODS


@pytest.mark.parametrize(
    ("method", "options", "field", "words"),
    [
        ("mocov2", {"proj_dim": 2**64}, "method_options.proj_dim", "at most 16384"),
        ("mocov2", {"queue_size": 2**40}, "method_options.queue_size", "at most"),
        ("mocov2", {"queue_size": 2**17, "proj_dim": 2048}, "method_options.queue_size", "queue_size x proj_dim"),
        ("mocov2", {"temperature": math.nan}, "method_options.temperature", "finite"),
        ("mocov2", {"temperature": math.inf}, "method_options.temperature", "finite"),
        ("mocov2", {"temperature": 1e-9}, "method_options.temperature", "between"),
        ("mocov2", {"key_momentum": math.nan}, "method_options.key_momentum", "finite"),
        ("mocov2", {"key_momentum": 1.5}, "method_options.key_momentum", "at most 1"),
        ("byol", {"ema": math.nan}, "method_options.ema", "finite"),
        ("byol", {"ema": -math.inf}, "method_options.ema", "finite"),
        ("byol", {"ema": 0}, "method_options.ema", "above 0"),
        ("ssql_byol", {"proj_hidden": 1e30}, "method_options.proj_hidden", "integer"),
        ("simclr", {"temperature": math.nan}, "method_options.temperature", "finite"),
        ("ssql", {"proj_dim": 2**64}, "method_options.proj_dim", "at most"),
        ("ssql", {"proj_dim": -1}, "method_options.proj_dim", "positive"),
        ("ssql", {"proj_dim": 64.0}, "method_options.proj_dim", "integer"),
        ("ssql", {"proj_dim": True}, "method_options.proj_dim", "integer"),
        ("ssql", {"pred_hidden": "64"}, "method_options.pred_hidden", "integer"),
        ("simsiam_pact", {"proj_dim": 2**40}, "method_options.proj_dim", "at most"),
    ],
)
def test_out_of_range_option_is_a_config_error_naming_it(method: str, options: dict, field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        METHODS[method].check_options(options)
    assert info.value.field == field
    assert words in info.value.reason, info.value.reason


def test_in_range_options_and_explicit_defaults_pass() -> None:
    METHODS["mocov2"].check_options({"proj_dim": 128, "queue_size": 65536, "temperature": 0.07, "key_momentum": 0.99})
    METHODS["mocov2"].check_options({"temperature": 1})  # an int where a number is expected
    METHODS["byol"].check_options({"ema": 1.0, "proj_dim": None})  # None = the width-derived default
    METHODS["ssql"].check_options({"proj_dim": 64, "pred_hidden": 16})
    for cls in METHODS.values():
        cls.check_options({k: v for k, v in cls.default_options.items() if v is not None})


def test_every_option_of_every_method_has_a_range() -> None:
    for name, cls in METHODS.items():
        assert set(cls.option_ranges) == set(cls.default_options), name


def test_config_validate_reports_the_option() -> None:
    cfg = PretrainConfig(method="mocov2", dataset="synthetic", method_options={"queue_size": 2**40})
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.field == "method_options.queue_size"


def test_moco_queue_shorter_than_the_batch_trains() -> None:
    """queue_size below 2 x batch_size is in range: the queue keeps the newest keys, no crash."""
    cfg = PretrainConfig(method="mocov2", dataset="synthetic", width=0.0625, image_size=16, batch_size=8,
                         method_options={"queue_size": 4, "proj_dim": 16}, device="cpu").validate()
    model = METHODS["mocov2"](cfg)
    x = torch.randn(8, 3, 16, 16)
    out = model.training_step(x, x.flip(3), 0)
    out.loss.backward()
    model.after_optimizer_step(0, 1)
    assert torch.isfinite(out.loss) and model.queue.shape == (4, 16) and int(model.queue_ptr) == 0
