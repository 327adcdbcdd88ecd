"""Which files of a finished job become downloadable artifacts (one place to extend).

Two sources, both hashed here so the API can serve the sha256 as ETag:

* ``OUTPUTS``: fixed ``(bits, format, filename)`` entries found in a kind's workdir;
* the runner's ``outputs`` (its ``result`` event): files it wrote whose names depend on the job,
  ``{"bits", "format", "file" (relative to the workdir), "owner"}``. ``owner == "source"``
  registers the file under the job's *source* job (an export job's files are served as the
  exported job's checkpoints).

Formats: ``torch`` (the FP backbone state dict), ``safetensors`` (packed, per bit-width),
``onnx`` (QDQ graph), ``torchvision`` (FP, torchvision names).

Files later jobs read (a pretrain's ``last.pt``, an eval's ``heads.pt``) are registered too, with
format ``input`` (:data:`persistence.api_store.INPUT_FORMAT`) and the file name as ``bits``: they
are never listed nor served, but their sha256 is what an eval / export / distill job checks the
file against before reading it (``corrupt_artifact``, docs/decisions/011).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from persistence.api_store import INPUT_FORMAT
from persistence.job_store import ArtifactRecord
from persistence.models import ARTIFACT_FORMATS

log = logging.getLogger("ssql.worker")

#: kind -> outputs to register when present: (bits, format, file name in the workdir)
OUTPUTS: dict[str, list[tuple[str, str, str]]] = {
    "pretrain": [("fp", "torch", "backbone.pt"), ("last.pt", INPUT_FORMAT, "last.pt")],
    "eval": [("heads.pt", INPUT_FORMAT, "heads.pt")],
    "finetune": [("finetuned.pt", INPUT_FORMAT, "finetuned.pt")],
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _record(path: Path, bits: str, fmt: str, artifacts_root: Path, job_id: str | None = None) -> ArtifactRecord:
    return ArtifactRecord(
        bits=bits,
        format=fmt,
        path=str(path.resolve().relative_to(artifacts_root)),
        bytes=path.stat().st_size,
        sha256=sha256_file(path),
        job_id=job_id,
    )


def collect_artifacts(
    kind: str,
    workdir: Path,
    artifacts_root: Path,
    reported: list[dict[str, Any]] | None = None,
    source_job_id: str | None = None,
) -> list[ArtifactRecord]:
    """Hash the job's output files; paths are stored relative to the artifacts root.

    A reported file must lie inside the workdir and have a known format, or it is ignored (logged).
    """
    records = []
    for bits, fmt, name in OUTPUTS.get(kind, []):
        path = workdir / name
        if path.is_file():
            records.append(_record(path, bits, fmt, artifacts_root))
    root = workdir.resolve()
    for out in reported or []:
        path = (workdir / str(out.get("file", ""))).resolve()
        if root not in path.parents or not path.is_file() or out.get("format") not in ARTIFACT_FORMATS:
            log.warning("ignoring reported output %r of a %s job in %s", out, kind, workdir)
            continue
        owner = source_job_id if out.get("owner") == "source" else None
        records.append(_record(path, str(out["bits"]), str(out["format"]), artifacts_root, owner))
    return records
