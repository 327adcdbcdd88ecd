"""Which files of a finished job become downloadable artifacts (one place to extend).

Each job kind lists ``(bits, format, filename)`` outputs found in its workdir; the helper hashes
them so the API can serve the sha256 as ETag. Export jobs (packed per-bit-width safetensors /
ONNX) add their entries here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from persistence.job_store import ArtifactRecord

#: kind -> outputs to register when present: (bits, format, file name in the workdir)
OUTPUTS: dict[str, list[tuple[str, str, str]]] = {
    "pretrain": [("fp", "torch", "backbone.pt")],
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def collect_artifacts(kind: str, workdir: Path, artifacts_root: Path) -> list[ArtifactRecord]:
    """Hash the job's output files; paths are stored relative to the artifacts root."""
    records = []
    for bits, fmt, name in OUTPUTS.get(kind, []):
        path = workdir / name
        if path.is_file():
            records.append(
                ArtifactRecord(
                    bits=bits,
                    format=fmt,
                    path=str(path.resolve().relative_to(artifacts_root)),
                    bytes=path.stat().st_size,
                    sha256=sha256_file(path),
                )
            )
    return records
