"""Issue 19 item 4, in the library: bit-widths are ASCII, learning-rate milestones increase."""

from __future__ import annotations

import pytest

from ssql_core.bits import parse_bits
from ssql_core.config import EvalConfig
from ssql_core.errors import ConfigError
from ssql_core.finetune import FinetuneConfig


@pytest.mark.parametrize("text", ["\uff14w\uff14a", "\u0664w\u0664a", "\uff46\uff50", "4w\uff14a", "\U0001d7dcw4a"])
def test_bits_with_non_ascii_digits_or_letters_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="ASCII"):
        parse_bits(text)


def test_ascii_spellings_still_parse() -> None:
    assert [str(parse_bits(b)) for b in ("4w4a", " 4W4F ", "FP", "2w8a")] == ["4w4a", "4w4a", "fp", "2w8a"]


@pytest.mark.parametrize("cls", [EvalConfig, FinetuneConfig])
@pytest.mark.parametrize("milestones", [(0.8, 0.6), (0.6, 0.6)])
def test_lr_milestones_must_be_strictly_increasing(cls: type, milestones: tuple) -> None:
    extra = {"checkpoint": "-"} if cls is FinetuneConfig else {}
    with pytest.raises(ConfigError) as e:
        cls(lr_milestones=milestones, **extra).validate()
    assert e.value.field == "lr_milestones"
    cls(lr_milestones=(0.6, 0.8), **extra).validate()
