"""A pretrain run's summary says how often each bit pair was drawn (SSQL methods only)."""

from __future__ import annotations

from pathlib import Path

from ssql_core.config import PretrainConfig
from ssql_core.sampler import BitSampler
from ssql_core.train import bit_pair_counts, pretrain


def test_counts_follow_the_sampler() -> None:
    s = BitSampler(3, (2, 8), (4, 8))
    counts = bit_pair_counts(s, 500)
    assert sum(counts.values()) == 500 and len(counts) <= 7 * 5
    assert counts[str(s.sample(0))] >= 1
    assert list(counts.values()) == sorted(counts.values(), reverse=True)
    assert all(2 <= int(k.split("w")[0]) <= 8 and 4 <= int(k.split("w")[1][:-1]) <= 8 for k in counts)


def test_summary_of_ssql_and_simsiam(tmp_path: Path) -> None:
    base = dict(dataset="synthetic", width=0.0625, image_size=16, batch_size=16, max_samples=64, epochs=1, device="cpu")
    ssql = pretrain(PretrainConfig(method="ssql", **base), tmp_path / "ssql")  # type: ignore[arg-type]
    assert sum(ssql["bit_pairs"].values()) == ssql["steps"] == 4
    simsiam = pretrain(PretrainConfig(method="simsiam", **base), tmp_path / "simsiam")  # type: ignore[arg-type]
    assert "bit_pairs" not in simsiam
