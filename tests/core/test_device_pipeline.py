"""The batched device pipeline (ssql_core.device_views) against torchvision's per-image pipeline,
its determinism, and the sync-free loop around it (docs/decisions/012). All on CPU tensors."""

import math

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from ssql_core import device_views as dv
from ssql_core.config import PretrainConfig
from ssql_core.data import load_split, pretrain_transform
from ssql_core.errors import Cancelled, NonFiniteLoss
from ssql_core.hooks import Hooks
from ssql_core.train import pretrain

CPU = torch.device("cpu")
TINY = dict(dataset="synthetic", width=0.0625, image_size=16, batch_size=16, max_samples=32, epochs=1, checkpoint_every_steps=3)


def _tv_crops(n, h, w, seed=0):
    torch.manual_seed(seed)
    img = torch.zeros(3, h, w)
    return torch.tensor([T.RandomResizedCrop.get_params(img, dv.SCALE, dv.RATIO) for _ in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("h,w", [(32, 32), (28, 28), (20, 64)])
def test_crop_scales_and_aspect_ratios_match_torchvision(h, w):
    n = 4000
    ours = dv.sample_crops(torch.Generator().manual_seed(1), n, h, w, CPU).double()  # left, top, w, h
    tv = _tv_crops(n, h, w)  # top, left, h, w
    ours_area, tv_area = ours[:, 2] * ours[:, 3] / (h * w), tv[:, 2] * tv[:, 3] / (h * w)
    ours_ar, tv_ar = torch.log(ours[:, 2] / ours[:, 3]), torch.log(tv[:, 3] / tv[:, 2])
    assert ks_2samp(ours_area.numpy(), tv_area.numpy()).pvalue > 1e-3
    assert ks_2samp(ours_ar.numpy(), tv_ar.numpy()).pvalue > 1e-3
    # inside the image, integer boxes, and offsets uniform over the free room
    assert (ours[:, 0] >= 0).all() and (ours[:, 0] + ours[:, 2] <= w).all()
    assert (ours[:, 1] >= 0).all() and (ours[:, 1] + ours[:, 3] <= h).all()
    assert torch.equal(ours, ours.round())
    rel = ours[:, 1] / (h - ours[:, 3] + 1)
    assert abs(rel.mean().item() - (tv[:, 0] / (h - tv[:, 2] + 1)).mean().item()) < 0.03


def test_rates_and_jitter_ranges():
    n = 20000
    p = dv.sample_params(torch.Generator().manual_seed(0), n, 32, 32, CPU)
    sd = lambda q: 4 * math.sqrt(q * (1 - q) / n)  # noqa: E731 - 4 standard deviations
    assert abs(p.jitter.float().mean().item() - 0.8) < sd(0.8)
    assert abs(p.gray.float().mean().item() - 0.2) < sd(0.2)
    assert abs(p.flip.float().mean().item() - 0.5) < sd(0.5)
    assert abs(p.blur.float().mean().item() - 0.5) < sd(0.5)
    for k, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        f = p.factors[:, k]
        assert lo <= f.min().item() < lo + 0.01 and hi - 0.01 < f.max().item() <= hi
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01  # uniform: mean at the centre
        assert abs(f.std().item() - (hi - lo) / math.sqrt(12)) < 0.01
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    for op in range(4):  # random order: each operation first in a quarter of the images
        assert abs((p.order[:, 0] == op).float().mean().item() - 0.25) < sd(0.25)
    assert 0.1 <= p.sigma.min().item() and p.sigma.max().item() <= 2.0


def test_batched_operations_equal_torchvision_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 12, 12, generator=g)
    f = torch.rand(6, generator=g) * 0.8 + 0.6
    h = torch.rand(6, generator=g) * 0.2 - 0.1
    for ours, theirs, fac in [(dv.adjust_brightness, TF.adjust_brightness, f), (dv.adjust_contrast, TF.adjust_contrast, f),
                              (dv.adjust_saturation, TF.adjust_saturation, f), (dv.adjust_hue, TF.adjust_hue, h)]:
        ref = torch.stack([theirs(x[i], float(fac[i])) for i in range(6)])
        torch.testing.assert_close(ours(x.clone(), fac), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dv.grayscale(x).expand_as(x), torch.stack([TF.rgb_to_grayscale(i, 3) for i in x]))
    # the full jitter in each image's own order, as torchvision's ColorJitter.forward
    p = dv.sample_params(g, 6, 12, 12, CPU)
    ref = []
    for i in range(6):
        y = x[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                fn = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
                y = fn(y, float(p.factors[i, op]))
        ref.append(y)
    torch.testing.assert_close(dv.color_jitter(x.clone(), p), torch.stack(ref), atol=1e-5, rtol=0)
    # crop + resize: roi_align equals bilinear resize of the crop away from the crop's border
    boxes = torch.tensor([[2.0, 3.0, 6.0, 5.0], [0.0, 0.0, 12.0, 12.0]])
    out = dv.resized_crops(x[:2], torch.arange(2), boxes, 16)
    for i, (left, top, w, hh) in enumerate(boxes.int().tolist()):
        ref = TF.resized_crop(x[i], top, left, hh, w, [16, 16], antialias=False)
        if i == 1:
            torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(out[i, :, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5, rtol=0)
    blur = dv.gaussian_blur(x[:2], torch.tensor([0.5, 1.5]), 5)
    for i, s in enumerate((0.5, 1.5)):
        torch.testing.assert_close(blur[i], TF.gaussian_blur(x[i], [5, 5], [s, s]), atol=1e-5, rtol=0)


def test_output_distribution_matches_the_per_image_pipeline():
    split = load_split("synthetic", True, 32)
    images = dv.in_memory_images(split.data)
    views = dv.DeviceViews(images, 32, "synthetic", seed=0, device=CPU)
    ours = torch.cat([torch.cat(views.views(0, b, torch.arange(b * 128, (b + 1) * 128))) for b in range(4)])
    tf = pretrain_transform(32, "synthetic")
    torch.manual_seed(0)
    theirs = torch.stack([tf(images[i % len(images)]) for i in range(len(ours))])
    assert ours.shape == theirs.shape == (1024, 3, 32, 32)
    for c in range(3):
        assert abs(ours[:, c].mean().item() - theirs[:, c].mean().item()) < 0.05
        assert abs(ours[:, c].std().item() / theirs[:, c].std().item() - 1) < 0.05

    def gray_rate(x):  # grayscale views have equal channels
        return ((x[:, 0] * 0.25 + 0.5 - (x[:, 1] * 0.25 + 0.5)).abs().amax(dim=(1, 2)) < 0.02).float().mean().item()

    assert abs(gray_rate(ours) - gray_rate(theirs)) < 0.06
    assert abs(gray_rate(ours) - 0.2) < 0.06


def test_views_are_a_pure_function_of_seed_epoch_batch():
    images = torch.randint(0, 256, (40, 3, 20, 20), dtype=torch.uint8)
    a = dv.DeviceViews(images, 16, "synthetic", seed=3, device=CPU)
    b = dv.DeviceViews(images.clone(), 16, "synthetic", seed=3, device=CPU)
    idx = torch.randperm(40)[:16]
    v1, v2 = a.views(2, 5, idx)
    w1, w2 = b.views(2, 5, idx)
    assert torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)
    assert not torch.equal(v1, a.views(2, 6, idx)[0]) and not torch.equal(v1, a.views(3, 5, idx)[0])
    assert not torch.equal(v1, dv.DeviceViews(images, 16, "synthetic", 4, CPU).views(2, 5, idx)[0])
    # a rank's shard of the global batch: the same views whatever the number of ranks
    s1, s2 = a.views(2, 5, idx, slice(8, 16))
    assert torch.equal(s1, v1[8:]) and torch.equal(s2, v2[8:])
    assert v1.shape == (16, 3, 16, 16) and v1.dtype == torch.float32


def test_grayscale_sets_stay_one_channel_in_memory():
    from torch.utils.data import Subset

    from ssql_core.data import TensorImages

    gray = torch.randint(0, 256, (20, 1, 16, 16), dtype=torch.uint8)
    ds = Subset(TensorImages(gray.expand(-1, 3, -1, -1), torch.zeros(20, dtype=torch.long)), [1, 3, 5, 7, 9, 11, 13, 15])
    images = dv.in_memory_images(ds)  # as the IDX datasets: 3 channels by a stride-0 view
    assert images is not None and images.shape == (8, 1, 16, 16) and torch.equal(images[1], gray[3])
    x1, _ = dv.DeviceViews(images, 16, "mnist", 0, CPU).views(0, 0, torch.arange(8))
    assert x1.shape == (8, 3, 16, 16)
    assert dv.in_memory_images(load_split("digits", True, 16).data).shape[1] == 3


class Recorder(Hooks):
    every_n_steps = 1

    def __init__(self, stop_at=None):
        self.events, self.stop_at = [], stop_at

    def on_progress(self, p):
        self.events.append(p)

    def should_stop(self):
        return self.stop_at is not None and self.events[-1].step >= self.stop_at


def test_device_pipeline_trains_and_resumes_exactly(tmp_path):
    cfg = dict(TINY, method="ssql", epochs=2, input_pipeline="device")
    summary = pretrain(PretrainConfig(**cfg), tmp_path / "a")
    assert summary["input_pipeline"] == "device" and summary["steps"] == 4
    with pytest.raises(Cancelled):
        pretrain(PretrainConfig(**cfg), tmp_path / "b", Recorder(stop_at=3))
    pretrain(PretrainConfig(**cfg), tmp_path / "b")
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # auto on the CPU keeps the per-image loader path
    assert pretrain(PretrainConfig(**dict(TINY, method="simsiam")), tmp_path / "c")["input_pipeline"] == "loader"


def test_non_finite_loss_stops_within_a_few_steps_and_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    from ssql_core.methods.simsiam import SimSiam

    real = SimSiam.training_step

    def poisoned(self, x1, x2, step):
        out = real(self, x1, x2, step)
        if step >= 3:
            out.loss = out.loss * float("nan")
        return out

    class Rare(Hooks):
        every_n_steps = 1000  # progress almost never: the loop still reads the loss every few steps

    monkeypatch.setattr(SimSiam, "training_step", poisoned)
    cfg = PretrainConfig(**dict(TINY, method="simsiam", batch_size=4, epochs=2, checkpoint_every_steps=5, input_pipeline="device"))
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at epoch 1, step 3: lower the learning rate"):
        pretrain(cfg, tmp_path, Rare())
    assert not (tmp_path / "last.pt").exists()  # the check runs before the checkpoint at step 5


def test_compiled_modules_do_not_recompile_per_bit_pair():
    import torch._dynamo

    from ssql_core.methods import build_method
    from ssql_core.runtime import compile_modules

    torch._dynamo.reset()
    cfg = PretrainConfig(method="ssql", dataset="synthetic", width=0.0625, image_size=16, batch_size=8).validate()
    model = compile_modules(build_method(cfg), backend="eager")
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    for step in range(2):  # one graph per quant mode (FP, record, quantized) is compiled here
        model.training_step(x1, x2, step).loss.backward()
    bits = {str(model.sampler.sample(s)) for s in range(2, 8)}
    assert len(bits) >= 4
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(2, 8):
            out = model.training_step(x1, x2, step)
            out.loss.backward()
            assert out.metrics["w_bits"] == model.sampler.sample(step).w


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_benchmark_refuses_without_cuda():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "bench/gpu_throughput.py"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
