"""Per-step random bit-widths keyed on (seed, global step).

Stateless by design: every data-parallel rank draws the same pair at a step, and a resumed run
draws exactly the sequence it would have drawn (SPEC 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssql_core.bits import BitWidth


@dataclass(frozen=True)
class BitSampler:
    seed: int
    w_range: tuple[int, int] = (2, 8)
    a_range: tuple[int, int] = (4, 8)

    def sample(self, step: int) -> BitWidth:
        """Independent uniform draws of weight and activation bits for ``step``."""
        rng = np.random.default_rng([self.seed, step, 0x55514C])
        w = int(rng.integers(self.w_range[0], self.w_range[1] + 1))
        a = int(rng.integers(self.a_range[0], self.a_range[1] + 1))
        return BitWidth(w, a)

    def state_dict(self) -> dict[str, object]:
        return {"seed": self.seed, "w_range": list(self.w_range), "a_range": list(self.a_range)}
