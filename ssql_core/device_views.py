"""The two augmented views of a batch, made on the training device from uint8 images in memory.

SPEC 5's pretraining augmentation (the per-image pipeline is ``data.pretrain_transform``), batched:
RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3), ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 in a
random order per image, RandomGrayscale(p=0.2), horizontal flip, Gaussian blur (p=0.5, sigma
0.1-2) only above 64 px as the per-image pipeline, then normalisation. Every random parameter is
drawn per image, with torchvision's distributions (the crop's ten attempts and its central-crop
fallback included), from a ``torch.Generator`` on the device seeded from (seed, epoch, batch):
the views of a batch are a pure function of those three numbers and of the images, whatever the
number of ranks (parameters are drawn for the global batch, each rank applies its shard's) and
wherever a resumed run restarted.

The image operations are torchvision's: ``torchvision.ops.roi_align`` crops and resizes every
image of the batch in one call (bilinear, pixel centres aligned as ``v2.functional.resize``;
it averages several samples per output pixel when it shrinks, an area filter where torchvision
uses an antialiased bilinear one), and the colour operations are the formulas of
``torchvision.transforms.v2.functional`` (brightness, contrast, saturation, hue, grayscale)
with a per-image factor instead of one scalar. The per-image pipeline runs on uint8 images and
rounds after each operation; this one stays in float32 (docs/decisions/012).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from ssql_core.data import _STATS, TensorImages, sample_seed

SCALE, RATIO = (0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_FLIP, P_BLUR = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_TAG = 0x56494557  # "VIEW": keeps these seeds apart from SeededViews' per-image ones


def in_memory_images(ds: Dataset) -> Tensor | None:
    """The dataset's images as one uint8 tensor [N, C, H, W] (C 1 or 3), or None when they are
    not held in memory (ImageFolder). CIFAR's HWC arrays are stacked once; grayscale images
    replicated to 3 channels by a stride-0 view are kept at one channel."""
    if isinstance(ds, Subset):
        base = in_memory_images(ds.dataset)
        return None if base is None else base[torch.as_tensor(list(ds.indices), dtype=torch.long)]
    if isinstance(ds, TensorImages):
        x = ds.images
        if x.dtype != torch.uint8 or x.dim() != 4:
            return None
        if x.shape[1] == 3 and x.stride(1) == 0:
            x = x[:, :1]
        return x
    data = getattr(ds, "data", None)  # torchvision's CIFAR10 / CIFAR100: uint8 ndarray [N, H, W, 3]
    if data is not None and getattr(data, "dtype", None) is not None and str(data.dtype) == "uint8" and data.ndim == 4:
        return torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    return None


@dataclass
class ViewParams:
    """Per-image random parameters of ``n`` views; boxes are (left, top, width, height) in pixels."""

    boxes: Tensor  # [n, 4] float, integer-valued
    jitter: Tensor  # [n] bool
    factors: Tensor  # [n, 4] brightness, contrast, saturation, hue
    order: Tensor  # [n, 4] long, a permutation of 0..3 (torchvision's fn_idx)
    gray: Tensor  # [n] bool
    flip: Tensor  # [n] bool
    blur: Tensor  # [n] bool
    sigma: Tensor  # [n] float

    def select(self, idx: slice | Tensor) -> ViewParams:
        return ViewParams(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def _uniform(g: torch.Generator, shape: tuple[int, ...], lo: float, hi: float, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=g, device=device).mul_(hi - lo).add_(lo)


def sample_crops(g: torch.Generator, n: int, height: int, width: int, device: torch.device,
                 scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO) -> Tensor:
    """``v2.RandomResizedCrop.make_params`` for ``n`` images at once: ten attempts each, the
    first that fits wins, else torchvision's central-crop fallback. [n, 4] (left, top, w, h)."""
    area = float(height * width)
    target = _uniform(g, (n, 10), scale[0], scale[1], device) * area
    aspect = torch.exp(_uniform(g, (n, 10), math.log(ratio[0]), math.log(ratio[1]), device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)  # first True (0 when none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u = torch.rand((n, 2), generator=g, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    # fallback (no attempt fitted): the central crop of the largest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    none = ~ok.any(dim=1)
    w = torch.where(none, torch.full_like(w, fw), w)
    h = torch.where(none, torch.full_like(h, fh), h)
    top = torch.where(none, torch.full_like(top, (height - fh) // 2), top)
    left = torch.where(none, torch.full_like(left, (width - fw) // 2), left)
    return torch.stack([left, top, w, h], dim=1)


def sample_params(g: torch.Generator, n: int, height: int, width: int, device: torch.device) -> ViewParams:
    """Every random choice of ``n`` views, drawn in a fixed order from ``g``."""
    boxes = sample_crops(g, n, height, width, device)
    jitter = torch.rand(n, generator=g, device=device) < P_JITTER
    u = torch.rand((n, 4), generator=g, device=device)
    b, c, s, hue = JITTER  # uniform in [1 - j, 1 + j] (hue: [-j, j]); python scalars, no host copy
    factors = torch.stack([u[:, 0] * (2 * b) + (1 - b), u[:, 1] * (2 * c) + (1 - c),
                           u[:, 2] * (2 * s) + (1 - s), u[:, 3] * (2 * hue) - hue], dim=1)
    order = torch.argsort(torch.rand((n, 4), generator=g, device=device), dim=1)
    gray = torch.rand(n, generator=g, device=device) < P_GRAY
    flip = torch.rand(n, generator=g, device=device) < P_FLIP
    blur = torch.rand(n, generator=g, device=device) < P_BLUR
    sigma = _uniform(g, (n,), BLUR_SIGMA[0], BLUR_SIGMA[1], device)
    return ViewParams(boxes, jitter, factors, order, gray, flip, blur, sigma)


# -- batched versions of torchvision.transforms.v2.functional's colour operations -------------
def _per_image(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=-3)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(-3)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _per_image(f)).clamp_(0, 1)


def _blend(x: Tensor, other: Tensor, f: Tensor) -> Tensor:
    f = _per_image(f)
    return (x * f + other * (1 - f)).clamp_(0, 1)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, grayscale(x), f)


def rgb_to_hsv(x: Tensor) -> Tensor:
    from torchvision.transforms.v2.functional._color import _rgb_to_hsv

    return _rgb_to_hsv(x)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """HSV to RGB by the closed form (each channel from k = (n + 6h) mod 6), which equals
    torchvision's table look-up and needs no host-made index tensor."""
    h, s, v = hsv.unbind(dim=-3)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h * 6 + n, 6)
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=-3)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    hsv = rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = torch.remainder(h + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def color_jitter(x: Tensor, p: ViewParams) -> Tensor:
    """ColorJitter on the images whose ``p.jitter`` is set, its four operations in each image's
    own order; a skipped brightness/contrast/saturation is the exact identity (factor 1)."""
    one = torch.ones_like(p.factors[:, 0])
    for pos in range(4):
        op = p.order[:, pos]
        for k, fn in enumerate((adjust_brightness, adjust_contrast, adjust_saturation)):
            x = fn(x, torch.where(p.jitter & (op == k), p.factors[:, k], one))
        sel = p.jitter & (op == 3)
        x = torch.where(_per_image(sel), adjust_hue(x, p.factors[:, 3]), x)
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """``v2.functional.gaussian_blur`` with one sigma per image (reflect padding, separable)."""
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, k]
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, h, w)


def resized_crops(images: Tensor, source: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop ``boxes[i]`` of image ``images[source[i]]`` and resize it to ``size`` x ``size``
    (torchvision's roi_align, aligned to pixel centres as ``resize``); float images in."""
    from torchvision.ops import roi_align

    left, top, w, h = boxes.unbind(dim=1)
    rois = torch.stack([source.to(boxes.dtype), left, top, left + w, top + h], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def apply_params(x: Tensor, p: ViewParams, blur_kernel: int | None) -> Tensor:
    """The augmentation after the crop, on float images in [0, 1] [n, 3, s, s] (not normalised)."""
    x = color_jitter(x, p)
    x = torch.where(_per_image(p.gray), grayscale(x).expand_as(x), x)
    x = torch.where(_per_image(p.flip), x.flip(-1), x)
    if blur_kernel is not None:
        x = torch.where(_per_image(p.blur), gaussian_blur(x, p.sigma, blur_kernel), x)
    return x


def blur_kernel_for(image_size: int) -> int | None:
    """The per-image pipeline's blur kernel (``data.pretrain_transform``), None at <= 64 px."""
    return int(0.1 * image_size) // 2 * 2 + 1 if image_size > 64 else None


class DeviceViews:
    """Two augmented, normalised views of any batch of an in-memory image set, on ``device``.

    ``images``: uint8 [N, C, H, W] with C 1 (grayscale, replicated after the crop) or 3; moved to
    the device once.
    """

    def __init__(self, images: Tensor, image_size: int, stats_key: str, seed: int, device: torch.device) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images.to(device).contiguous()
        self.size, self.seed, self.device = image_size, seed, device
        self.height, self.width = int(images.shape[2]), int(images.shape[3])
        mean, std = _STATS[stats_key]
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.inv_std = 1.0 / torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.blur_kernel = blur_kernel_for(image_size)

    def __len__(self) -> int:
        return len(self.images)

    def generator(self, epoch: int, batch: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, epoch, batch, _TAG))

    def params(self, epoch: int, batch: int, n: int) -> tuple[ViewParams, ViewParams]:
        """The random parameters of both views of a global batch of ``n`` images."""
        g = self.generator(epoch, batch)
        return (sample_params(g, n, self.height, self.width, self.device),
                sample_params(g, n, self.height, self.width, self.device))

    def views(self, epoch: int, batch: int, indices: Tensor, shard: slice | None = None) -> tuple[Tensor, Tensor]:
        """Views 1 and 2 of ``indices`` (the global batch, a long tensor on the device) as float32
        [n, 3, size, size]; ``shard`` picks this rank's part (parameters are drawn for the whole
        global batch, so a rank's views do not depend on the number of ranks)."""
        p1, p2 = self.params(epoch, batch, len(indices))
        if shard is not None:
            indices, p1, p2 = indices[shard], p1.select(shard), p2.select(shard)
        return self.augment(indices, p1, p2)

    def augment(self, indices: Tensor, p1: ViewParams, p2: ViewParams) -> tuple[Tensor, Tensor]:
        n = len(indices)
        src = self.images[indices].float().mul_(1.0 / 255.0)
        source = torch.arange(n, device=self.device).repeat(2)
        crops = resized_crops(src, source, torch.cat([p1.boxes, p2.boxes]), self.size)
        crops = crops.expand(-1, 3, -1, -1) if crops.shape[1] == 1 else crops
        both = ViewParams(*(torch.cat([getattr(p1, f), getattr(p2, f)]) for f in ViewParams.__dataclass_fields__))
        x = apply_params(crops, both, self.blur_kernel)
        x = (x - self.mean) * self.inv_std
        return x[:n], x[n:]
