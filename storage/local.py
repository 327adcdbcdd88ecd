"""The embedded default: objects are files under one folder (``SSQL_HOME/store``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from storage.base import ObjectStore, StoreUnavailable, check_key, sha256_file


class LocalStore(ObjectStore):
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.root = Path(unquote(parts.path if parts.scheme else url)).expanduser().resolve()
        self.url = f"file://{self.root}"

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path, sha256: str | None = None) -> str:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            shutil.copyfile(path, tmp)
            digest = sha256_file(tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return digest

    def _download(self, key: str, dest: Path) -> None:
        src = self.path(key)
        if not src.is_file():
            raise FileNotFoundError(f"no object {key!r} in {self.url}")
        shutil.copyfile(src, dest)

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {key!r} in {self.url}") from None

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with open(self.path(key), "rb") as f:
                f.seek(start)
                return f.read(max(length, 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"no object {key!r} in {self.url}") from None

    def put_bytes(self, key: str, data: bytes) -> None:
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"store folder {self.root} cannot be created: {e}") from e
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable(f"store folder {self.root} is not writable")
