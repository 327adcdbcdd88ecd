"""Top-1 vs model size (issue 20 item 3) from the client and the CLI: ``plot_pareto`` and
``ssql results --plot`` on rows of real eval jobs (uniform bit-widths with an autobit row; AdaRound),
checked on the figure's artists (lines and their points, the SVG's groups), not on pixels."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.service.conftest import clean_env

ROWS: list[dict[str, Any]] = [
    {"bits": "fp", "top1": 70.0, "model_bytes": 400_000, "weight_bits_avg": 32.0},
    {"bits": "8w8a", "top1": 69.0, "model_bytes": 110_000, "weight_bits_avg": 8.0, "ptq": "calibrate"},
    {"bits": "4w4a", "top1": 60.0, "model_bytes": 60_000, "weight_bits_avg": 4.0, "ptq": "calibrate"},
    {"bits": "4w8a", "top1": 64.0, "model_bytes": 60_000, "weight_bits_avg": 4.0, "ptq": "calibrate"},
    {"bits": "2w4a", "top1": 30.0, "model_bytes": 35_000, "weight_bits_avg": 2.0, "ptq": "calibrate"},
    {"bits": "mixed-0123abcd", "top1": 62.0, "model_bytes": 50_000, "weight_bits_avg": 3.0, "ptq": "calibrate",
     "autobit": {"solver": "milp"}},
    {"bits": "3w3a", "top1": 50.0},  # a row written before sizes were recorded: not on this chart
]


def _lines(ax: Any) -> tuple[list[Any], list[Any]]:
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-"]
    return solid, [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]


def test_series_split_where_sizes_collide_and_the_front(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from ssql_client.plot import pareto_front, pareto_series, plot_pareto, plot_results

    named = {name: [r["bits"] for r in rs] for name, rs in pareto_series(ROWS)}
    # 4w4a and 4w8a store the same weights: one x, two y, so the uniform rows split by activation bits
    assert named == {"uniform · calibrate · 8-bit act.": ["4w8a", "8w8a"], "uniform · calibrate · 4-bit act.": ["2w4a", "4w4a"],
                     "autobit · calibrate": ["mixed-0123abcd"]}  # fmt: skip
    assert [r["bits"] for r in pareto_front(ROWS)] == ["2w4a", "mixed-0123abcd", "4w8a", "8w8a", "fp"]
    ax = plot_pareto({"ssql": ROWS}, tmp_path / "p.png")
    solid, dashed = _lines(ax)
    assert [len(ln.get_xdata()) for ln in solid] == [2, 2, 1] and len(dashed) == 1
    assert list(solid[0].get_xdata()) == [60.0, 110.0] and list(solid[0].get_ydata()) == [64.0, 69.0]  # KB, sorted by size
    assert dashed[0].get_ydata()[0] == 70.0
    bits = plot_pareto({"ssql": ROWS}, x="bits")
    assert list(_lines(bits)[0][0].get_xdata()) == [4.0, 8.0]
    assert (tmp_path / "p.png").stat().st_size > 5000
    fig = plot_results({"ssql": ROWS}, tmp_path / "both.png")
    assert len(fig.axes) == 2 and fig.axes[1].get_xlabel().startswith("model size")
    old = plot_results({"ssql": [{"bits": "fp", "top1": 70.0}, {"bits": "4w4a", "top1": 60.0}]}, tmp_path / "old.png")
    assert len(old.axes) == 1  # no sizes: top-1 vs bit-width alone, as before


def test_plot_of_real_eval_jobs(client: httpx.Client, pareto_evals: list[str], tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from ssql_client.plot import plot_results

    uniform_auto, adaround = (client.get(f"/v1/jobs/{j}/results").json()["rows"] for j in pareto_evals)
    assert all(isinstance(r["model_bytes"], int) and r["model_bytes"] > 0 for r in uniform_auto + adaround)
    fig = plot_results({"calibrate": uniform_auto, "adaround": adaround}, tmp_path / "two.png")
    solid, dashed = _lines(fig.axes[1])
    labels = [ln.get_label() for ln in solid]
    assert labels == ["calibrate: uniform · calibrate", "calibrate: autobit · calibrate", "adaround: uniform · adaround"]
    assert [len(ln.get_xdata()) for ln in solid] == [2, 1, 2] and len(dashed) == 1  # only the first job has an fp row
    sizes = {r["bits"]: r["model_bytes"] / 1000 for r in uniform_auto}
    assert list(solid[0].get_xdata()) == [sizes["2w4a"], sizes["4w4a"]]
    assert sizes["2w4a"] < sizes[uniform_auto[3]["bits"]] < sizes["4w4a"]  # autobit at 3 bits lies between


def test_cli_results_plot_writes_both_panels(stack, api_key: str, pareto_evals: list[str], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = clean_env(SSQL_URL=stack.url, SSQL_API_KEY=api_key)
    png, svg = tmp_path / "pareto.png", tmp_path / "pareto.svg"
    for out, ids in ((png, pareto_evals[:1]), (svg, pareto_evals)):
        proc = subprocess.run([sys.executable, "-m", "ssql_cli.main", "results", *ids, "--plot", str(out)], env=env,
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and "wrote" in proc.stderr, proc.stdout + proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = svg.read_text()
    assert "model size (KB, packed)" in text and "bit-width (weights w / activations a)" in text  # both panels' x labels
    # each series is a group named by its gid; its points are the marker uses inside it
    points = {m.group(1): m.group(2).count("<use ") for m in re.finditer(r'<g id="(pareto-\d+)">(.*?)</g>', text, re.S)}
    assert sorted(points.values()) == [1, 2, 2], points
    assert len(re.findall(r'<g id="pareto-fp-\d+">', text)) == 1


def test_rows_written_before_sizes_get_them_from_the_architecture(client: httpx.Client, sessions,  # type: ignore[no-untyped-def]
                                                                  pareto_evals: list[str]) -> None:
    """An eval job's rows without model_bytes (recorded before decision 020) are answered with the
    sizes the evaluation would have recorded, computed from the pretrain's backbone: equal to
    what this job's evaluation did record, for every uniform row (the autobit row keeps its own)."""
    from sqlalchemy import select

    from persistence.models import JobResult

    job_id = pareto_evals[0]
    recorded = client.get(f"/v1/jobs/{job_id}/results").json()["rows"]
    fields = ("model_bytes", "weight_bits_avg", "bops")
    with sessions() as s:
        saved = {r.id: r.row for r in s.scalars(select(JobResult).where(JobResult.job_id == job_id))}
        for r in s.scalars(select(JobResult).where(JobResult.job_id == job_id)):
            if not r.bits.startswith("mixed-"):
                r.row = {k: v for k, v in r.row.items() if k not in fields}
        s.commit()
    try:
        stripped = client.get(f"/v1/jobs/{job_id}/results").json()["rows"]
        csv_text = client.get("/v1/compare/results.csv", params={"job": job_id}).text
    finally:
        with sessions() as s:
            for r in s.scalars(select(JobResult).where(JobResult.job_id == job_id)):
                r.row = saved[r.id]
            s.commit()
    assert [r["bits"] for r in stripped] == [r["bits"] for r in recorded]
    for old, new in zip(recorded, stripped, strict=True):
        assert {k: new[k] for k in fields} == {k: old[k] for k in fields}, old["bits"]
        assert new.get("sizes_computed") is (None if old["bits"].startswith("mixed-") else True)
    assert "sizes_computed" in csv_text.splitlines()[0] and str(recorded[1]["model_bytes"]) in csv_text
    assert client.get(f"/v1/jobs/{job_id}/results").json()["rows"] == recorded  # put back
