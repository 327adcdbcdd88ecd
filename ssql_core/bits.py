"""Bit-width notation: ``"{w}w{a}a"`` (e.g. ``"4w4a"``, ``"2w8a"``) or ``"fp"``.

The reference code's spelling ``"4w4f"`` is accepted as an alias of ``"4w4a"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MIN_BITS, MAX_BITS = 2, 8
#: ASCII digits only: ``\d`` would take full-width and other Unicode digits ("４w４a")
_PATTERN = re.compile(r"^([0-9]+)w([0-9]+)[af]$", re.ASCII)
ACCEPTED_FORMS = "'fp' or '{w}w{a}a' with w and a integers from 2 to 8 (e.g. '4w4a', '2w8a'; '4w4f' is accepted too)"


@dataclass(frozen=True, order=True)
class BitWidth:
    """Weight and activation bits; both ``None`` means full precision."""

    w: int | None
    a: int | None

    @property
    def is_fp(self) -> bool:
        return self.w is None and self.a is None

    def __str__(self) -> str:
        return "fp" if self.is_fp else f"{self.w}w{self.a}a"


FP = BitWidth(None, None)


def parse_bits(value: str | BitWidth) -> BitWidth:
    """Parse a bit-width string; anything else raises ``ValueError`` naming the accepted forms."""
    if isinstance(value, BitWidth):
        return value
    if not isinstance(value, str):
        raise ValueError(f"bit-width must be a string, got {type(value).__name__}; accepted: {ACCEPTED_FORMS}")
    s = value.strip().lower()
    if not s.isascii():
        raise ValueError(f"invalid bit-width {value!r}: only ASCII letters and digits; accepted: {ACCEPTED_FORMS}")
    if s == "fp":
        return FP
    m = _PATTERN.match(s)
    if not m:
        raise ValueError(f"invalid bit-width {value!r}; accepted: {ACCEPTED_FORMS}")
    w, a = int(m.group(1)), int(m.group(2))
    for name, b in (("weight", w), ("activation", a)):
        if not MIN_BITS <= b <= MAX_BITS:
            raise ValueError(
                f"invalid bit-width {value!r}: {name} bits {b} outside {MIN_BITS}..{MAX_BITS}; accepted: {ACCEPTED_FORMS}"
            )
    return BitWidth(w, a)


#: The paper's evaluation set (SPEC 6.5).
PAPER_BITS: tuple[str, ...] = ("fp", "8w8a", "6w6a", "5w5a", "4w4a", "3w3a", "2w8a", "2w4a")
