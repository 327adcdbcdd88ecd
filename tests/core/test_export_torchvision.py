"""FP weights that load into torchvision's models with strict=True."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from ssql_core.export import CheckpointError
from ssql_core.export.torchvision_format import load_torchvision, write_torchvision
from ssql_core.models import build_backbone


def _randomize_bn(m: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_resnet_backbone_loads_into_plain_torchvision(tmp_path: Path) -> None:
    ours = _randomize_bn(build_backbone("resnet18", "imagenet", 1.0))
    path = write_torchvision(tmp_path / "r18.safetensors", ours)
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(load_file(str(path)), strict=True)  # the recipe users follow, verbatim
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (tv.eval()(x) - ours(x)).abs().max().item() <= 1e-5
        assert torch.equal(load_torchvision(path)(x), tv(x))


def test_head_becomes_fc_and_cifar_stem_needs_the_documented_changes(tmp_path: Path) -> None:
    ours = _randomize_bn(build_backbone("resnet18", "cifar", 1.0))
    head = {"weight": torch.randn(10, 512), "bias": torch.randn(10)}
    path = write_torchvision(tmp_path / "c.safetensors", ours, head)
    state = load_file(str(path))
    plain = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(RuntimeError, match="conv1.weight"):
        plain.load_state_dict(state, strict=True)  # 7x7 stem in torchvision, 3x3 here
    plain.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool = nn.Identity()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expect = ours(x) @ head["weight"].t() + head["bias"]
        assert (plain.eval()(x) - expect).abs().max().item() <= 1e-4
        assert (load_torchvision(path)(x) - expect).abs().max().item() <= 1e-4


def test_mobilenet_and_refusals(tmp_path: Path) -> None:
    ours = _randomize_bn(build_backbone("mobilenet_v2", "cifar", 1.0))
    path = write_torchvision(tmp_path / "m.safetensors", ours)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (load_torchvision(path)(x) - ours(x)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="width multiplier"):
        write_torchvision(tmp_path / "w.safetensors", build_backbone("resnet18", "cifar", 0.5))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_torchvision(tmp_path / "bad.safetensors")
