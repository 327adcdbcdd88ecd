"""The configuration that crashed PyTorch's CPU kernels on an AMD EPYC machine (glibc "double free
or corruption" in NHWC convolutions of 4-channel ResNets on one thread) must be kept out of: the
trainer runs contiguous on the CPU whatever ``channels_last`` says, and the tiny pretrain that
died in 4 of 4 runs there survives in every child process here."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from ssql_core.config import PretrainConfig
from ssql_core.hooks import Hooks
from ssql_core.runtime import use_channels_last
from ssql_core.train import _Trainer

CRASHING_RUN = textwrap.dedent("""
    import sys, tempfile, torch
    torch.set_num_threads(1)
    from ssql_core.config import PretrainConfig
    from ssql_core.train import pretrain
    with tempfile.TemporaryDirectory() as wd:
        s = pretrain(PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16,
                                    batch_size=16, max_samples=64, epochs=1, device="cpu",
                                    seed=int(sys.argv[1])), wd)
    assert s["steps"] == 4, s
""")


def test_channels_last_is_cuda_only() -> None:
    assert use_channels_last(torch.device("cpu"), True) is False
    assert use_channels_last(torch.device("cuda"), True) is True
    assert use_channels_last(torch.device("cuda"), False) is False


def test_trainer_keeps_cpu_tensors_contiguous(tmp_path) -> None:
    cfg = PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16, batch_size=16,
                         max_samples=32, epochs=1, device="cpu", channels_last=True).validate()
    trainer = _Trainer(cfg, tmp_path, Hooks())
    assert trainer.channels_last is False
    convs = [p for p in trainer.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)


def test_crashing_configuration_survives_in_child_processes() -> None:
    for seed in range(4):
        proc = subprocess.run([sys.executable, "-c", CRASHING_RUN, str(seed)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"run {seed} died with {proc.returncode}:\n{proc.stderr[-2000:]}"
