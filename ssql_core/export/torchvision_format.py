"""FP weights that load into torchvision's own model with ``strict=True``.

Our backbones keep torchvision's parameter names (quant points hold no persistent state), so the
backbone's ``state_dict`` is torchvision's minus the classifier. The file is safetensors with a
manifest saying how to build the receiving model:

* ResNet: ``m = torchvision.models.resnet18(); m.fc = nn.Identity()`` (backbone), or ``m.fc`` an
  ``nn.Linear(feat_dim, num_classes)`` holding the evaluation's head;
* MobileNetV2: ``m.classifier = nn.Identity()``, or ``m.classifier[1]`` resized to the head;
* CIFAR stem: ResNet ``m.conv1 = nn.Conv2d(3, base, 3, 1, 1, bias=False); m.maxpool = nn.Identity()``;
  MobileNetV2 ``m.features[0][0].stride = (1, 1)``;
* width multiplier 1 only (torchvision's ResNet has no width multiplier).

:func:`build_torchvision` does all of this; :func:`load_torchvision` reads a file into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torchvision
from safetensors.torch import save_file
from torch import Tensor, nn

from ssql_core.export.format import (
    FORMAT_VERSION,
    CheckpointError,
    check_arch,
    read_safetensors,
    tensor_digest,
    write_atomic,
)
from ssql_core.export.quantized import check_standard_backbone

FORMAT = "ssql-torchvision-weights"
_HEAD_KEYS = {"mobilenet_v2": ("classifier.1.weight", "classifier.1.bias")}
_RESNET_HEAD = ("fc.weight", "fc.bias")


def build_torchvision(arch: dict[str, Any], num_classes: int | None = None) -> nn.Module:
    """torchvision's model for ``arch`` with our stem and our head (or none); see module docstring."""
    name, stem, width = arch["name"], arch["stem"], float(arch["width"])
    if width != 1.0:
        raise ValueError(f"torchvision's {name} has no width multiplier: width {width} cannot be loaded into it")
    m = getattr(torchvision.models, name)(weights=None)
    if name == "mobilenet_v2":
        if stem == "cifar":
            m.features[0][0].stride = (1, 1)
        if num_classes is None:
            m.classifier = nn.Identity()
        else:
            m.classifier[1] = nn.Linear(m.last_channel, num_classes)
        return m
    if stem == "cifar":
        m.conv1 = nn.Conv2d(3, m.conv1.out_channels, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    m.fc = nn.Identity() if num_classes is None else nn.Linear(m.fc.in_features, num_classes)
    return m


def torchvision_state(backbone: nn.Module, head: dict[str, Tensor] | None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(arch, state_dict)`` under torchvision's names, the head as its classifier."""
    arch = check_standard_backbone(backbone)
    build_torchvision(arch)  # refuses what torchvision cannot hold before anything is written
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    if head is not None:
        wk, bk = _HEAD_KEYS.get(arch["name"], _RESNET_HEAD)
        state[wk], state[bk] = head["weight"].float().contiguous(), head["bias"].float().contiguous()
    return arch, state


def write_torchvision(path: str | Path, backbone: nn.Module, head: dict[str, Tensor] | None = None,
                      info: dict[str, Any] | None = None) -> Path:
    """Write the FP torchvision-compatible weights of ``backbone`` (+ head) to ``path``."""
    path = Path(path)
    arch, state = torchvision_state(backbone, head)
    num_classes = None if head is None else int(head["weight"].shape[0])
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": arch, "bits": "fp",
                "num_classes": num_classes, "kind": "classifier" if head is not None else "backbone",
                "load": "ssql_core.export.torchvision_format.build_torchvision(arch, num_classes) then "
                        "load_state_dict(safetensors.torch.load_file(path), strict=True)",
                "stem_note": "cifar stem: conv1 3x3 stride 1 padding 1 and maxpool Identity (ResNet); "
                             "features[0][0].stride (1, 1) (MobileNetV2)",
                **(info or {})}
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "manifest": text, "sha256": tensor_digest(text, state)}
    return write_atomic(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_torchvision(path: str | Path) -> nn.Module:
    """torchvision's model with the file's weights, loaded ``strict=True`` (after the hash check)."""
    manifest, state = read_safetensors(path, FORMAT)
    n = manifest.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000):
        raise CheckpointError(f"{path}: manifest num_classes {n!r} is not a class count")
    try:
        model = build_torchvision(check_arch(manifest.get("arch")), manifest.get("num_classes"))
        model.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{path}: does not load into torchvision's model: {e}") from None
    return model.eval()
