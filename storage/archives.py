"""Reading an uploaded image-folder archive safely: the checks of an upload and the extraction
into a worker's cache share one entry walker, so nothing the check refused can be extracted.

Layout ``train/<class>/...`` and ``val/<class>/...``, optionally inside one top-level folder.
Refused: entries with ``..``, absolute or drive paths, links and device files; archives past the
entry-count, unpacked-size or ratio limits (zip bombs); files under ``train``/``val`` that are not
images or do not decode with Pillow; fewer than 2 classes, or a class without a train and a val
image. Hidden files and ``__MACOSX`` folders are skipped.
"""

from __future__ import annotations

import io
import os
import re
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

#: the archive formats, by the Content-Type of the upload
CONTENT_TYPES = {"application/zip": "zip", "application/x-zip-compressed": "zip", "application/x-tar": "tar",
                 "application/gzip": "tar.gz", "application/x-gzip": "tar.gz", "application/octet-stream": "auto"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SPLITS = ("train", "val")
#: offending files named in an error, at most
MAX_NAMED = 20
#: one image file above this is refused (it is read whole to be decoded)
MAX_IMAGE_BYTES = 64 << 20


def sniff(path: Path) -> str | None:
    """The format of an archive sent as ``application/octet-stream``, by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


@dataclass(frozen=True)
class Limits:
    max_entries: int = 200_000
    max_unpacked_bytes: int = 16 << 30
    max_ratio: float = 100.0


class ArchiveError(Exception):
    """The archive as a whole cannot be used (not an archive, truncated, a bomb)."""


@dataclass
class Report:
    classes: list[str] = field(default_factory=list)
    train_images: int = 0
    val_images: int = 0
    unpacked_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0

    def problem(self, name: str, why: str) -> None:
        if len(self.problems) < MAX_NAMED:
            self.problems.append(f"{name}: {why}")
        else:
            self.more_problems += 1

    def error(self) -> str | None:
        if not self.problems:
            return None
        more = f" (and {self.more_problems} more)" if self.more_problems else ""
        return "; ".join(self.problems) + more


@dataclass
class _Entry:
    name: str
    kind: str  # "file", "dir" or why it is refused ("symlink", "hard link", "device file")
    size: int
    packed: int | None  # zip: compressed size of the entry


def _safe_parts(name: str) -> tuple[str, ...] | None:
    """The path's components, or None when it is absolute, climbs, or is otherwise unsafe."""
    if "\x00" in name or name.startswith(("/", "\\")) or "\\" in name or (len(name) > 1 and name[1] == ":"):
        return None
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        return None
    return parts


def _zip_entries(zf: zipfile.ZipFile) -> Iterator[tuple[_Entry, object]]:
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            kind = "symlink"
        elif info.is_dir():
            kind = "dir"
        elif mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            kind = "device file"
        else:
            kind = "file"
        yield _Entry(info.filename, kind, info.file_size, info.compress_size), info


def _tar_entries(tf: tarfile.TarFile) -> Iterator[tuple[_Entry, object]]:
    for info in tf:
        if info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hard link"
        elif info.isdir():
            kind = "dir"
        elif info.isreg():
            kind = "file"
        else:
            kind = "device file"
        yield _Entry(info.name, kind, info.size, None), info


class _Archive:
    """An open archive: its entries in order and a reader of each file's bytes (capped)."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt
        try:
            if fmt == "zip":
                self._zf = zipfile.ZipFile(path)
            elif fmt in ("tar", "tar.gz"):
                self._tf = tarfile.open(path, "r:" if fmt == "tar" else "r:gz")
            else:
                raise ArchiveError(f"unknown archive format {fmt!r}")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
            raise ArchiveError(f"not a readable {fmt} archive ({type(e).__name__}: {e})") from None

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        (self._zf if self.fmt == "zip" else self._tf).close()

    def entries(self) -> Iterator[tuple[_Entry, object]]:
        try:
            yield from (_zip_entries(self._zf) if self.fmt == "zip" else _tar_entries(self._tf))
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
            raise ArchiveError(f"the archive is truncated or corrupt ({type(e).__name__}: {e})") from None

    def read(self, entry: _Entry, info: object, cap: int) -> bytes:
        """The file's bytes; more than ``cap`` (a size that lied) raises :class:`ArchiveError`."""
        try:
            f = self._zf.open(info) if self.fmt == "zip" else self._tf.extractfile(info)  # type: ignore[arg-type]
            assert f is not None
            with f:
                data = f.read(cap + 1)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zipfile.LargeZipFile) as e:
            raise ArchiveError(f"{entry.name}: truncated or corrupt ({type(e).__name__}: {e})") from None
        if len(data) > cap:
            raise ArchiveError(f"{entry.name}: holds more bytes than the archive declares")
        return data


def _skipped(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _layout(names: list[tuple[str, ...]]) -> int:
    """How many leading components to strip: 1 when every entry sits in one top-level folder
    that is not itself ``train``/``val``, else 0."""
    tops = {p[0] for p in names if p}
    if len(tops) == 1 and next(iter(tops)) not in SPLITS and all(len(p) > 1 or p == (next(iter(tops)),) for p in names):
        return 1
    return 0


def _decode(data: bytes) -> str | None:
    """None when Pillow decodes the image fully, else why not."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem
        why = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip()  # Pillow names its in-memory file object
        return f"does not decode as an image ({type(e).__name__}: {why})" if why else f"does not decode as an image ({type(e).__name__})"
    return None


def _walk(path: Path, fmt: str, limits: Limits, report: Report) -> Iterator[tuple[tuple[str, ...], _Entry, object, _Archive]]:
    """Every image file (its path relative to the dataset root, e.g. ``("train", "cat", "1.png")``),
    after the archive-wide checks; problems go to ``report``. Yields inside the open archive."""
    size = max(path.stat().st_size, 1)
    with _Archive(path, fmt) as archive:
        listed: list[tuple[tuple[str, ...], _Entry, object]] = []
        count = unpacked = 0
        for entry, info in archive.entries():
            count += 1
            if count > limits.max_entries:
                raise ArchiveError(f"more than {limits.max_entries} entries (the server's SSQL_DATASET_MAX_ENTRIES)")
            parts = _safe_parts(entry.name)
            if parts is None:
                report.problem(entry.name, "unsafe path (absolute, '..' or a drive)")
                continue
            if entry.kind not in ("file", "dir"):
                report.problem(entry.name, f"a {entry.kind} (only plain files are accepted)")
                continue
            if entry.kind == "dir" or not parts:
                continue
            unpacked += entry.size
            if unpacked > limits.max_unpacked_bytes:
                raise ArchiveError(f"unpacks to more than {limits.max_unpacked_bytes} bytes (SSQL_DATASET_MAX_UNPACKED_BYTES)")
            if entry.packed is not None and entry.size > 1 << 20 and entry.size > limits.max_ratio * max(entry.packed, 1):
                raise ArchiveError(f"{entry.name}: compression ratio above {limits.max_ratio:g}:1 (a zip bomb?)")
            listed.append((parts, entry, info))
        if unpacked > (1 << 20) and unpacked > limits.max_ratio * size:
            raise ArchiveError(f"unpacks to {unpacked} bytes from {size}: ratio above {limits.max_ratio:g}:1 (a zip bomb?)")
        report.unpacked_bytes = unpacked
        strip = _layout([p for p, _, _ in listed])
        for parts, entry, info in listed:
            rel = parts[strip:]
            if not rel or _skipped(rel) or rel[0] not in SPLITS:
                continue  # a README, __MACOSX, .DS_Store: not part of the dataset
            if len(rel) < 3:
                report.problem(entry.name, f"must be inside a class folder ({rel[0]}/<class>/...)")
                continue
            if not rel[-1].lower().endswith(IMAGE_EXTENSIONS):
                report.problem(entry.name, f"not an image file ({', '.join(IMAGE_EXTENSIONS)})")
                continue
            if entry.size > MAX_IMAGE_BYTES:
                report.problem(entry.name, f"larger than {MAX_IMAGE_BYTES} bytes")
                continue
            yield rel, entry, info, archive


def inspect(path: Path, fmt: str, limits: Limits = Limits()) -> Report:
    """Check the whole archive without extracting it: every entry's path and kind, the limits,
    the layout and class counts, and that every image decodes."""
    report = Report()
    counts: dict[str, dict[str, int]] = {}
    for rel, entry, info, archive in _walk(path, fmt, limits, report):
        reason = _decode(archive.read(entry, info, entry.size))
        if reason:
            report.problem(entry.name, reason)
            continue
        counts.setdefault(rel[1], {"train": 0, "val": 0})[rel[0]] += 1
    report.classes = sorted(counts)
    report.train_images = sum(c["train"] for c in counts.values())
    report.val_images = sum(c["val"] for c in counts.values())
    if not report.problems:
        if not report.train_images or not report.val_images:
            missing = [s for s, n in (("train", report.train_images), ("val", report.val_images)) if not n]
            report.problem("/".join(missing) + "/", "missing: expected train/<class>/* and val/<class>/* (optionally in one top-level folder)")
        elif len(counts) < 2:
            report.problem(f"train/{report.classes[0]}/", "only one class: at least 2 are needed")
        else:
            for name, c in sorted(counts.items()):
                for split in SPLITS:
                    if not c[split]:
                        report.problem(f"{split}/{name}/", f"class {name!r} has no {split} image")
    return report


def extract(path: Path, fmt: str, dest: Path, limits: Limits = Limits()) -> int:
    """Write the archive's images under ``dest/{train,val}/<class>/`` (top-level folder stripped);
    only regular files, created fresh, each checked to land inside ``dest``. Returns the count.
    Raises :class:`ArchiveError` on any problem (the archive was checked at upload; this is the
    second line of defence)."""
    report = Report()
    dest = dest.resolve()
    n = 0
    for rel, entry, info, archive in _walk(path, fmt, limits, report):
        target = dest.joinpath(*rel)
        if dest not in target.resolve().parents:
            raise ArchiveError(f"{entry.name}: escapes the dataset folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as f:
            f.write(archive.read(entry, info, entry.size))
        n += 1
    if report.problems:
        raise ArchiveError(report.error() or "")
    return n


def pack_folder(folder: Path, out: Path) -> Path:
    """A tar.gz of an image folder (what ``ssql datasets upload DIR`` sends): regular files only."""
    folder = folder.resolve()
    with tarfile.open(out, "w:gz") as tf:
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            for name in sorted(files):
                p = Path(root) / name
                if p.is_file() and not p.is_symlink():
                    tf.add(p, arcname=str(p.relative_to(folder)), recursive=False)
    return out
