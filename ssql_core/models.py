"""Quantizable backbones with torchvision's parameter names, and projection heads as data.

Quant layout (SPEC 3): stem conv 8-bit weights and 8-bit output activation; inside a block the
first convs' outputs (after BN+ReLU) quantized at ``a`` bits; the conv before the residual add and
the downsample conv have ``w``-bit weights and an unquantized output; the block output (after add
and ReLU) is quantized at ``a`` bits. The pooled feature and the input image are not quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models.mobilenetv2 import InvertedResidual

from ssql_core.qnn import FIXED8, STEP, ActQuant, QConv2d, QLinear


def _conv(cin: int, cout: int, k: int, stride: int = 1, role: str = STEP, groups: int = 1) -> QConv2d:
    c = QConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False, groups=groups)
    c.role = role
    return c


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.act1 = ActQuant()
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act_out = ActQuant()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(_conv(cin, planes, 1, stride), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.act_out(self.relu(out + identity))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = ActQuant()
        self.conv2 = _conv(planes, planes, 3, stride)  # stride on the 3x3, as torchvision (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = ActQuant()
        self.conv3 = _conv(planes, out, 1)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.act_out = ActQuant()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(_conv(cin, out, 1, stride), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.relu(self.bn1(self.conv1(x))))
        out = self.act2(self.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return self.act_out(self.relu(out + identity))


class ResNet(nn.Module):
    """ResNet backbone (no classifier). ``stem="cifar"``: 3x3 stride-1 conv, no max-pool."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], stem: str = "imagenet", width: float = 1.0) -> None:
        super().__init__()
        base = max(1, int(round(64 * width)))
        self.arch = {"stem": stem, "width": width}
        if stem == "cifar":
            self.conv1 = _conv(3, base, 3, 1, role=FIXED8)
        else:
            self.conv1 = QConv2d(3, base, 7, stride=2, padding=3, bias=False)
            self.conv1.role = FIXED8
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.act_stem = ActQuant(FIXED8)
        self.maxpool = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, 2, 1)
        cin = base
        for i, n in enumerate(layers):
            planes = base * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride=2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act_stem(self.relu(self.bn1(self.conv1(x)))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


class _QReLU6(nn.ReLU6):
    """ReLU6 followed by an activation quant point (keeps torchvision's module names)."""

    def __init__(self, role: str = STEP) -> None:
        super().__init__(inplace=False)
        self.aq = ActQuant(role)

    def forward(self, x: Tensor) -> Tensor:
        return self.aq(super().forward(x))


class _QInvertedResidual(InvertedResidual):
    """torchvision's block with its output quantized, as ResNet's block outputs are."""

    act_out: ActQuant

    def forward(self, x: Tensor) -> Tensor:
        return self.act_out(super().forward(x))


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 features with quant points; ``stem="cifar"`` uses stride 1."""

    def __init__(self, stem: str = "imagenet", width: float = 1.0) -> None:
        super().__init__()
        self.arch = {"stem": stem, "width": width}
        ref = mobilenet_v2(weights=None, width_mult=width)
        self.features = ref.features
        _quantize_children(self.features)
        stem_seq = self.features[0]
        stem_seq[0].role = FIXED8
        stem_seq[2].aq.role = FIXED8
        if stem == "cifar":
            stem_seq[0].stride = (1, 1)
        for m in self.features:
            if isinstance(m, InvertedResidual):
                m.__class__ = _QInvertedResidual
                m.act_out = ActQuant()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feat_dim = ref.last_channel

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


def _quantize_children(module: nn.Module) -> None:
    """Swap Conv2d -> QConv2d (same parameters) and ReLU6 -> ReLU6 + quant point, recursively."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and not isinstance(child, QConv2d):
            child.__class__ = QConv2d
            child.role = STEP
        elif isinstance(child, nn.ReLU6) and not isinstance(child, _QReLU6):
            setattr(module, name, _QReLU6())
        else:
            _quantize_children(child)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda stem="imagenet", width=1.0: ResNet(BasicBlock, [2, 2, 2, 2], stem, width),
    "resnet34": lambda stem="imagenet", width=1.0: ResNet(BasicBlock, [3, 4, 6, 3], stem, width),
    "resnet50": lambda stem="imagenet", width=1.0: ResNet(Bottleneck, [3, 4, 6, 3], stem, width),
    "mobilenet_v2": lambda stem="imagenet", width=1.0: MobileNetV2(stem, width),
}


def build_backbone(name: str, stem: str = "imagenet", width: float = 1.0, init: str = "torchvision") -> nn.Module:
    """A backbone by name. ``init="torchvision"``: torchvision's initialisation (kaiming-normal
    fan_out convolutions); ``"pytorch"``: every layer's own ``reset_parameters`` (nn.Conv2d's
    kaiming-uniform with a=sqrt(5)), as the reference implementation leaves its ResNets."""
    if init not in ("torchvision", "pytorch"):
        raise ValueError(f"init must be 'torchvision' or 'pytorch', got {init!r}")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    if stem not in ("cifar", "imagenet"):
        raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
    model = BACKBONES[name](stem=stem, width=width)
    model.arch = {"name": name, **model.arch}
    if init == "pytorch":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                m.reset_parameters()
    return model


@dataclass(frozen=True)
class MLPSpec:
    """A projection/prediction head as data: ``dims[0] -> ... -> dims[-1]``.

    Hidden layers are Linear-BN-ReLU (BN optional); the last layer is Linear, optionally followed
    by BN (``last_bn``; ``last_bn_affine=False`` as SimSiam's projector). ``quantized`` makes the
    Linear layers 8-bit weight quant points (the SSQL projector; SPEC 3).
    """

    dims: tuple[int, ...]
    hidden_bn: bool = True
    last_bn: bool = False
    last_bn_affine: bool = True
    quantized: bool = False

    def build(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        n = len(self.dims) - 1
        for i in range(n):
            last = i == n - 1
            followed_by_bn = self.last_bn if last else self.hidden_bn
            lin_cls = QLinear if self.quantized else nn.Linear
            lin = lin_cls(self.dims[i], self.dims[i + 1], bias=not followed_by_bn)
            if self.quantized:
                lin.role = FIXED8
            layers.append(lin)
            if not last:
                if self.hidden_bn:
                    layers.append(nn.BatchNorm1d(self.dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
            elif self.last_bn:
                layers.append(nn.BatchNorm1d(self.dims[-1], affine=self.last_bn_affine))
        return nn.Sequential(*layers)
