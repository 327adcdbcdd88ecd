"""The storage layer on both backends: a local folder and S3 (moto's server over real HTTP).

Digests recorded at write and checked at read, multipart uploads, the registry by scheme, and the
archive checks and cache a worker relies on. No Postgres needed.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from storage import DigestMismatch, ObjectStore, StoreUnavailable, open_store
from storage.archives import ArchiveError, Limits, extract, inspect, pack_folder
from storage.cache import DatasetCache
from storage.fetched import FetchedCopies
from tests.service.s3 import CREDENTIALS, moto_endpoint

BUCKET = "ssql-test"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_endpoint(BUCKET) as url:
        yield url


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ObjectStore:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}")
    endpoint = request.getfixturevalue("s3_endpoint")
    # boto3 reads the standard variables itself: the endpoint from AWS_ENDPOINT_URL
    for k, v in {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(k, v)
    return open_store(f"s3://{BUCKET}/p{os.getpid()}-{tmp_path.name}", multipart_bytes=5 << 20)


def test_roundtrip_digest_and_delete(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(3000))
    digest = store.put_file("x/a.bin", src)
    import hashlib

    assert digest == hashlib.sha256(src.read_bytes()).hexdigest()
    assert store.exists("x/a.bin")
    out = store.get_file("x/a.bin", tmp_path / "out" / "a.bin", digest)
    assert out.read_bytes() == src.read_bytes()
    with pytest.raises(DigestMismatch):
        store.get_file("x/a.bin", tmp_path / "bad.bin", "0" * 64)
    assert not (tmp_path / "bad.bin").exists()  # a refused object leaves nothing behind
    store.delete("x/a.bin")
    assert not store.exists("x/a.bin")
    store.check()  # reachable and writable: no error
    with pytest.raises(ValueError):
        store.put_file("../escape", src)


def test_s3_multipart_for_large_files(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    from storage.s3 import S3Store

    store = S3Store(f"s3://{BUCKET}/multi", endpoint_url=s3_endpoint, multipart_bytes=5 << 20)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 << 20))
    digest = store.put_file("big.bin", big)
    assert store.etag("big.bin").endswith("-3")  # three parts: 5 + 5 + 1 MiB
    assert store.get_file("big.bin", tmp_path / "back.bin", digest).stat().st_size == 11 << 20
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 100)
    store.put_file("small.bin", small)
    assert "-" not in store.etag("small.bin")


def test_s3_unreachable_is_store_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssql_cli.stack import free_port
    from storage.s3 import S3Store

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    store = S3Store(f"s3://{BUCKET}/x", endpoint_url=f"http://127.0.0.1:{free_port()}")
    store.client.meta.config.retries = {"max_attempts": 1}
    f = tmp_path / "f"
    f.write_bytes(b"1")
    with pytest.raises(StoreUnavailable):
        store.put_file("f", f)
    with pytest.raises(StoreUnavailable):
        store.check()


def test_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="no object store"):
        open_store("gopher://x/y")


# --- archives -------------------------------------------------------------------------------

def png(color: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (color, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def make_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_split: int = 2) -> Path:
    for split in ("train", "val"):
        for i, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_split):
                (d / f"{j}.png").write_bytes(png(40 * i + j))
    return root


def zip_of(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def good_entries(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{s}/{c}/{j}.png": png(j) for s in ("train", "val") for c in ("a", "b") for j in range(2)}


def test_inspect_good_zip_with_top_folder(tmp_path: Path) -> None:
    report = inspect(zip_of(tmp_path / "d.zip", {**good_entries("pets/"), "pets/README.txt": b"hi"}), "zip")
    assert report.error() is None
    assert (report.classes, report.train_images, report.val_images) == (["a", "b"], 4, 4)


@pytest.mark.parametrize("bad_name,why", [("../evil.png", "unsafe"), ("/abs/x.png", "unsafe"), ("train/a/../../x.png", "unsafe")])
def test_inspect_unsafe_paths(tmp_path: Path, bad_name: str, why: str) -> None:
    report = inspect(zip_of(tmp_path / "d.zip", {**good_entries(), bad_name: png()}), "zip")
    assert report.error() is not None and bad_name in report.error() and why in report.error()


def test_tar_links_and_devices_refused_and_never_extracted(tmp_path: Path) -> None:
    arc = tmp_path / "d.tar"
    with tarfile.open(arc, "w") as tf:
        for name, data in good_entries().items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("train/a/link.png", tarfile.SYMTYPE), ("train/a/hard.png", tarfile.LNKTYPE), ("train/a/dev", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd"
            tf.addfile(info)
    report = inspect(arc, "tar")
    err = report.error() or ""
    assert "link.png: a symlink" in err and "hard.png: a hard link" in err and "train/a/dev: a device file" in err
    with pytest.raises(ArchiveError):
        extract(arc, "tar", tmp_path / "out")
    assert not any(p.is_symlink() for p in (tmp_path / "out").rglob("*"))


def test_zip_bomb_ratio_and_entry_limits(tmp_path: Path) -> None:
    bomb = zip_of(tmp_path / "bomb.zip", {**good_entries(), "train/a/zeros.png": b"\0" * (20 << 20)})
    with pytest.raises(ArchiveError, match="ratio"):
        inspect(bomb, "zip")
    with pytest.raises(ArchiveError, match="entries"):
        inspect(zip_of(tmp_path / "many.zip", good_entries()), "zip", Limits(max_entries=5))
    with pytest.raises(ArchiveError, match="unpacks to more"):
        inspect(zip_of(tmp_path / "big.zip", good_entries()), "zip", Limits(max_unpacked_bytes=100))


def test_truncated_and_non_archives(tmp_path: Path) -> None:
    good = zip_of(tmp_path / "d.zip", good_entries())
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError):
        inspect(cut, "zip")
    tgz = pack_folder(make_folder(tmp_path / "f"), tmp_path / "d.tar.gz")
    cut_tgz = tmp_path / "cut.tar.gz"
    cut_tgz.write_bytes(tgz.read_bytes()[: tgz.stat().st_size - 40])
    with pytest.raises(ArchiveError):
        inspect(cut_tgz, "tar.gz")
    with pytest.raises(ArchiveError):
        inspect(good, "tar.gz")  # a zip sent as a tar.gz


def test_layout_class_and_decode_problems(tmp_path: Path) -> None:
    one = {k: v for k, v in good_entries().items() if "/b/" not in k}
    assert "only one class" in (inspect(zip_of(tmp_path / "1.zip", one), "zip").error() or "")
    no_val = {k: v for k, v in good_entries().items() if k.startswith("train/")}
    assert "missing" in (inspect(zip_of(tmp_path / "2.zip", no_val), "zip").error() or "")
    no_b_val = {k: v for k, v in good_entries().items() if not k.startswith("val/b/")}
    assert "class 'b' has no val image" in (inspect(zip_of(tmp_path / "3.zip", no_b_val), "zip").error() or "")
    broken = {**good_entries(), "train/a/broken.png": b"\x89PNG not really"}
    why = inspect(zip_of(tmp_path / "4.zip", broken), "zip").error() or ""
    assert "train/a/broken.png: does not decode" in why and " at 0x" not in why, why  # no object reprs of the server's
    many_bad = {**good_entries(), **{f"train/a/bad{i}.jpg": b"x" for i in range(30)}}
    err = inspect(zip_of(tmp_path / "5.zip", many_bad), "zip").error() or ""
    assert err.count("does not decode") == 20 and "(and 10 more)" in err


def test_cache_downloads_once_verifies_and_evicts(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    archives = []
    for n in range(2):
        arc = pack_folder(make_folder(tmp_path / f"f{n}", per_split=1 + n), tmp_path / f"d{n}.tar.gz")
        archives.append((f"d{n}.tar.gz", store.put_file(f"d{n}.tar.gz", arc)))
    cache = DatasetCache(tmp_path / "cache", max_bytes=10**9)
    folder, downloaded = cache.ensure(store, archives[0][0], archives[0][1], "tar.gz")
    assert downloaded and sorted(p.name for p in (folder / "train").iterdir()) == ["cat", "dog"]
    assert cache.ensure(store, archives[0][0], archives[0][1], "tar.gz") == (folder, False)
    with pytest.raises(DigestMismatch):
        cache.ensure(store, archives[1][0], "f" * 64, "tar.gz")
    assert not (tmp_path / "cache" / ("f" * 64)).exists()
    cache.max_bytes = 1  # room for one: the least recently used goes, the one just fetched stays
    second, _ = cache.ensure(store, archives[1][0], archives[1][1], "tar.gz")
    assert second.is_dir() and not folder.exists()


def test_api_fetched_copies_are_shared_verified_and_bounded(tmp_path: Path) -> None:
    """The API's copies of stored files: one per digest, a mismatch leaves nothing, and beyond the
    bound the least recently served goes, but never one served within the grace period."""
    store = open_store(f"file://{tmp_path / 'store'}")
    keys = []
    for n in range(3):
        (tmp_path / f"a{n}").write_bytes(bytes([n]) * 1000)
        keys.append((f"artifacts/{n}", store.put_file(f"artifacts/{n}", tmp_path / f"a{n}")))
    copies = FetchedCopies(tmp_path / "fetched", max_bytes=10**9, grace_seconds=0)
    first = copies.path(store, *keys[0])
    assert first.read_bytes() == bytes([0]) * 1000 and first.name == keys[0][1]
    store.delete(keys[0][0])
    assert copies.path(store, *keys[0]) == first  # served from the copy, not fetched again
    with pytest.raises(DigestMismatch):
        copies.path(store, keys[1][0], "f" * 64)
    assert not (tmp_path / "fetched" / ("f" * 64)).exists()
    second = copies.path(store, *keys[1])
    os.utime(tmp_path / "fetched" / f"{keys[1][1]}.used", (1, 1))  # the second was served long ago
    copies.max_bytes = 2000  # room for two: the least recently served goes, the one just fetched stays
    third = copies.path(store, *keys[2])
    assert third.is_file() and first.is_file() and not second.exists()
    copies.grace_seconds, copies.max_bytes = 3600, 0  # over the bound, but both were served just now
    assert copies.evict() == [] and first.is_file() and third.is_file()
