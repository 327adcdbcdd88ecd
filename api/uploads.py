"""``"dataset": "upload:<id>"`` in job requests: the owner's ready dataset, checked at submission.

ssql_core validates dataset names and knows nothing of uploads, so the library checks the rest of
the request with the dataset's image-folder stand-in (``imagefolder:<sha256>``, the name the
worker's cache gives it) and the stored spec keeps ``upload:<id>``; the worker resolves it.
"""

from __future__ import annotations

from typing import Any

from api.errors import FieldError
from persistence import dataset_store


async def ready_dataset(conn: Any, owner: int, name: str, given: bool = True) -> Any:
    """The owner's ready dataset named ``upload:<id>``, or a 422 on ``dataset``."""
    dataset_id = dataset_store.upload_id(name) or ""
    row = await dataset_store.get(conn, owner, dataset_id)
    whose = "" if given else " (the source job's dataset)"
    if row is None:
        raise FieldError(("body", "dataset"), f"no dataset {dataset_id!r} of yours{whose}: upload one with POST /v1/datasets "
                         "(ssql datasets upload) and use the id it returns")
    if row["status"] != "ready":
        why = "still validating: wait until GET /v1/datasets/{id} says ready" if row["status"] == "validating" else f"invalid: {row['error']}"
        raise FieldError(("body", "dataset"), f"dataset {dataset_id}{whose} is {why}")
    return row


async def stand_in(conn: Any, owner: int, raw: dict[str, Any]) -> dict[str, Any]:
    """Replace an ``upload:<id>`` dataset in ``raw`` by its image-folder stand-in (in place);
    returns {stand-in: (upload name, train images)} for :func:`restore`."""
    name = raw.get("dataset")
    if dataset_store.upload_id(name) is None:
        return {}
    row = await ready_dataset(conn, owner, name)
    raw["dataset"] = f"imagefolder:{row['sha256']}"
    return {raw["dataset"]: (name, row["train_images"])}


async def restore(conn: Any, owner: int, spec: dict[str, Any], swapped: dict[str, Any]) -> int | None:
    """Put the ``upload:<id>`` name back into the spec; check a dataset taken over from the source
    job (eval, finetune, distill default to their pretrain's) is still ready. Returns the upload's
    train image count (what a cost estimate needs), None for other datasets."""
    config = spec.get("config") or {}
    name = config.get("dataset")
    if name in swapped:
        config["dataset"], images = swapped[name]
        return images
    if dataset_store.upload_id(name) is not None:
        return (await ready_dataset(conn, owner, name, given=False))["train_images"]
    return None
