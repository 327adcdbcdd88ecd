"""Packed safetensors checkpoints: exact reload at every bit-width, size, and refusal of bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ssql_core.export import (
    CheckpointError,
    fake_quant_reference,
    load_quantized,
    save_quantized,
    size_report,
)
from ssql_core.export.format import FORMAT, decode, read_safetensors
from ssql_core.export.quantized import quantize_backbone
from ssql_core.models import build_backbone
from ssql_core.qnn import bind_context
from tests.core.backbones import random_backbone


def calibrated(width: float = 0.0625, seed: int = 0, size: int = 16, name: str = "resnet18", stem: str = "cifar") -> nn.Module:
    """A random-init backbone with non-trivial BN statistics and ranges calibrated on noise."""
    bb = random_backbone(name, seed, width, stem)
    ctx = bind_context(bb)
    with ctx.recording(), torch.no_grad():
        bb(torch.randn(16, 3, size, size))
    return bb


@pytest.fixture(scope="module")
def small() -> nn.Module:
    return calibrated()


@pytest.mark.parametrize("w", range(2, 9))
def test_reload_matches_fake_quant_every_bit_width(small: nn.Module, w: int, tmp_path: Path) -> None:
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(w))
    for a in range(2, 9):
        bits = f"{w}w{a}a"
        path = save_quantized(small, bits, tmp_path / f"{bits}.safetensors")
        model = load_quantized(path)
        with torch.no_grad():
            diff = (model(x) - fake_quant_reference(small, bits, x)).abs().max().item()
        assert diff <= 1e-5, f"{bits}: max abs diff {diff}"
        assert str(model.bits) == bits and model.manifest["bits"] == bits


@pytest.mark.parametrize("bits", ["2w4a", "3w3a", "5w8a", "8w2a"])
def test_file_integers_are_the_fake_quant_integers(small: nn.Module, bits: str, tmp_path: Path) -> None:
    path = save_quantized(small, bits, tmp_path / "q.safetensors")
    q_file, _ = decode(*read_safetensors(path, FORMAT))
    q_mem = quantize_backbone(small, bits)
    assert set(q_file.weights) == set(q_mem.weights)
    w = int(bits[0])
    for name, qw in q_mem.weights.items():
        got = q_file.weights[name]
        assert torch.equal(got.ints, qw.ints) and torch.equal(got.scale, qw.scale), name
        expect = 8 if name == "conv1.weight" else w  # the stem stays 8-bit (SPEC 3)
        assert got.bits == expect and int(got.ints.min()) >= -(1 << (expect - 1)) and int(got.ints.max()) < (1 << (expect - 1))
    with safe_open(str(path), "pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
        assert f.get_slice("backbone.layer1.0.conv1.weight.packed").get_dtype() == "U8"
    assert manifest["bn_folded"] is False
    assert manifest["arch"] == {"name": "resnet18", "stem": "cifar", "width": 0.0625}
    assert manifest["weights"]["backbone.layer1.0.conv1.weight"]["layout"] == "bitstream-le"
    assert manifest["activations"]["backbone.act_stem"]["bits"] == 8


def test_fp_and_classifier_round_trip(small: nn.Module, tmp_path: Path) -> None:
    x = torch.randn(3, 3, 16, 16)
    model = load_quantized(save_quantized(small, "fp", tmp_path / "fp.safetensors"))
    with torch.no_grad():
        assert torch.equal(model(x), small(x))
    head = {"weight": torch.randn(10, small.feat_dim), "bias": torch.randn(10)}
    clf = load_quantized(save_quantized(small, "4w4a", tmp_path / "c.safetensors", head=head))
    with torch.no_grad():
        expect = fake_quant_reference(small, "4w4a", x) @ head["weight"].t() + head["bias"]
        assert clf(x).shape == (3, 10)
        assert (clf(x) - expect).abs().max().item() <= 1e-5
    assert clf.manifest["kind"] == "classifier" and clf.manifest["head"]["num_classes"] == 10


@pytest.fixture(scope="module")
def medium() -> nn.Module:
    """Width 0.5: 2.8 M weights, enough that the safetensors index is a small part of the file."""
    return calibrated(width=0.5, size=8)


@pytest.mark.parametrize("w", [2, 3, 4, 5, 6, 8])
def test_size_within_5_percent_of_ideal(medium: nn.Module, w: int, tmp_path: Path) -> None:
    bb = medium
    path = save_quantized(bb, f"{w}w{w}a", tmp_path / "m.safetensors")
    rep = size_report(path)
    n = sum(m.weight.numel() for m in bb.modules() if isinstance(m, nn.Conv2d))
    stem = bb.conv1.weight.numel()
    assert rep["quantized_weights"] == n
    assert rep["weight_bytes_ideal"] == pytest.approx((n - stem) * w / 8 + stem)
    assert rep["ratio"] <= 1.05, rep
    # and the packed weights really are b bits each: far below the FP32 file
    assert rep["file_bytes"] < (n * 4) * (w + 1) / 32


def _corrupt(src: Path, dst: Path, edit) -> Path:
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(edit(data)))
    return dst


def test_truncated_tampered_and_foreign_files_refused(small: nn.Module, tmp_path: Path) -> None:
    good = save_quantized(small, "4w4a", tmp_path / "good.safetensors")
    size = good.stat().st_size
    truncated = _corrupt(good, tmp_path / "t.safetensors", lambda d: d[: size - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_quantized(truncated)

    def flip_last_byte(d: bytearray) -> bytearray:
        d[-1] ^= 0x01
        return d

    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(_corrupt(good, tmp_path / "f.safetensors", flip_last_byte))
    header_end = 8 + int.from_bytes(good.read_bytes()[:8], "little")

    def edit_manifest(d: bytearray) -> bytearray:
        old = b'\\"bits\\":\\"4w4a\\"'  # the manifest is JSON inside the header's JSON
        i = d.index(old, 0, header_end)
        d[i:i + len(old)] = old.replace(b"4w4a", b"2w4a")
        return d

    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(_corrupt(good, tmp_path / "m.safetensors", edit_manifest))
    with pytest.raises(CheckpointError, match="not a readable"):
        load_quantized(_corrupt(good, tmp_path / "g.safetensors", lambda d: b"\x80\x03garbage, maybe a pickle"))
    with pytest.raises(CheckpointError, match="no such file"):
        load_quantized(tmp_path / "missing.safetensors")
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="not an ssql-quantized-checkpoint"):
        load_quantized(other)


def test_uncalibrated_backbone_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibrate"):
        save_quantized(build_backbone("resnet18", "cifar", 0.0625), "4w4a", tmp_path / "x.safetensors")


def test_backbone_with_attached_qat_quantizers_refused(tmp_path: Path) -> None:
    from ssql_core.quantizers.attach import attach

    bb = calibrated()
    attach(bb, "pact", "4w4a")  # PACT takes over at 4w4a: PSQ integers would not be what it runs
    with pytest.raises(ValueError, match="carry their own quantizers"):
        save_quantized(bb, "4w4a", tmp_path / "x.safetensors")


def test_mobilenet_round_trip(tmp_path: Path) -> None:
    bb = calibrated(0.25, seed=1, name="mobilenet_v2")
    x = torch.randn(2, 3, 16, 16)
    for bits in ("3w5a", "8w8a"):
        model = load_quantized(save_quantized(bb, bits, tmp_path / f"{bits}.safetensors"))
        with torch.no_grad():
            assert (model(x) - fake_quant_reference(bb, bits, x)).abs().max().item() <= 1e-5


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Re-sign an edited manifest: a well-formed file that lies, as a hostile upload could."""
    from safetensors.torch import save_file

    from ssql_core.export.format import tensor_digest

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    manifest = json.loads(meta["manifest"])
    edit(manifest)
    text = json.dumps(manifest)
    save_file(tensors, str(dst), metadata={**meta, "manifest": text, "sha256": tensor_digest(text, tensors)})
    return dst


def test_well_formed_but_inconsistent_manifest_refused(small: nn.Module, tmp_path: Path) -> None:
    good = save_quantized(small, "4w4a", tmp_path / "good.safetensors")
    assert load_quantized(_rewrite(good, tmp_path / "same.safetensors", lambda m: None)).manifest["bits"] == "4w4a"
    cases = {
        "do not match the resnet18 layout": lambda m: m["activations"]["backbone.act_stem"].update(bits=4),
        "width must be": lambda m: m["arch"].update(width=1e6),
        "unknown architecture": lambda m: m["arch"].update(name="os.system"),
        "need": lambda m: m["weights"]["backbone.layer1.0.conv1.weight"].update(bits=3),
        "invalid bit-width": lambda m: m.update(bits="16w16a"),
    }
    for i, (message, edit) in enumerate(cases.items()):
        with pytest.raises(CheckpointError, match=message):
            load_quantized(_rewrite(good, tmp_path / f"bad{i}.safetensors", edit))


def test_any_single_byte_flip_is_refused_or_harmless(small: nn.Module, tmp_path: Path) -> None:
    good = save_quantized(small, "3w5a", tmp_path / "good.safetensors")
    data = good.read_bytes()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expect = load_quantized(good)(x)
    rng = torch.Generator().manual_seed(0)
    header_end = 8 + int.from_bytes(data[:8], "little")
    # half the flips in the header (JSON, manifest), half in the tensor bytes
    spots = torch.cat([torch.randint(0, header_end, (30,), generator=rng), torch.randint(header_end, len(data), (30,), generator=rng)])
    refused = 0
    for i, pos in enumerate(spots.tolist()):
        bad = bytearray(data)
        bad[pos] ^= 1 << (i % 8)
        path = tmp_path / f"flip{i}.safetensors"
        path.write_bytes(bytes(bad))
        try:
            model = load_quantized(path)
        except CheckpointError:
            refused += 1
            continue
        with torch.no_grad():  # accepted only when nothing that matters changed (header padding)
            assert torch.equal(model(x), expect), pos
    assert refused >= 55
