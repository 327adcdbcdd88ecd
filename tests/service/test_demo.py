"""The README's first command, ``ssql demo``, end to end (shortened): its own embedded stack under
a fresh SSQL_HOME, the table with each bit-width's drop from FP, the labelled pointer to where the
method's point is measured, the packed 4w4a download verified and loaded back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end_and_says_what_it_shows(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSQL_")}
    env.update(SSQL_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "ssql_cli.main", "demo", "--epochs", "2", "--eval-epochs", "3"],
                         capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "sha256" in text and "verified" in text and "loaded back" in text
    table = text[text.index("top-1 % of the one SSQL backbone"):]
    for bits in ("fp", "8w8a", "4w4a", "3w3a", "2w8a", "2w4a"):
        assert f"\n{bits} " in table
    assert "mse" in table and "bn" in table  # our evaluation defaults, named in the rows
    assert "cannot be seen on digits" in text and "Fashion-MNIST" in text
