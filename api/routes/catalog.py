"""What this server accepts: datasets, backbones, methods, bit-widths and limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep
from api.specs import DEFAULT_EXPORT_BITS, MAX_EXPORT_BITS, SERVER_FIELDS
from persistence.models import ARTIFACT_FORMATS, JOB_KINDS
from ssql_core.catalog import catalog as core_catalog

router = APIRouter(tags=["catalog"])


@router.get("/v1/catalog")
async def get_catalog(settings: SettingsDep) -> dict[str, Any]:
    """The library's catalog, with this server's limits applied on top (no auth needed): job kinds,
    quantizers (distill), export formats, the bit-widths a pretrain job exports by default and
    each kind's defaults (``defaults``)."""
    from ssql_core.export import FORMATS
    from ssql_core.quantizers import INT_WEIGHT_FAMILIES, QUANTIZER_NAMES

    cat = dict(core_catalog())
    limits = dict(cat.get("limits") or {})
    limits.update(
        max_epochs=settings.max_epochs,
        max_eval_epochs=settings.max_eval_epochs,
        max_batch_size=settings.max_batch_size,
        max_image_size=settings.max_image_size,
        max_bits_per_eval=settings.max_bits_per_eval,
        max_devices=settings.max_devices,
        max_attempts=settings.max_attempts,
        allow_download=settings.allow_download,
    )
    limits.update(max_upload_bytes=settings.max_upload_bytes, max_dataset_bytes_per_owner=settings.max_dataset_bytes_per_owner)
    cat["limits"] = limits
    # your own uploads (POST /v1/datasets, `ssql datasets upload`): the id that answer gives
    cat["datasets"] = [*cat.get("datasets", []), "upload:<id>"]
    cat["job_kinds"] = list(JOB_KINDS)
    cat["quantizers"] = list(QUANTIZER_NAMES)
    cat["packed_quantizers"] = list(INT_WEIGHT_FAMILIES)  # distilled students exported as packed files
    cat["export_formats"] = list(FORMATS)
    cat["artifact_formats"] = list(ARTIFACT_FORMATS)
    cat["default_export_bits"] = list(DEFAULT_EXPORT_BITS)
    limits["max_export_bits"] = MAX_EXPORT_BITS
    cat["defaults"] = _defaults()
    return cat


def _defaults() -> dict[str, dict[str, Any]]:
    """What each kind's request fields default to (what the server fills in for a field left out;
    ``null``: decided by the run, e.g. the dataset of the source job): the submit form shows them."""
    from ssql_core.config import EVAL_PRESETS, PRESETS, EvalConfig, PretrainConfig
    from ssql_core.distill import DistillConfig
    from ssql_core.finetune import FinetuneConfig

    server = {*SERVER_FIELDS, "checkpoint", "heads", "method_options"}
    out = {kind: {k: v for k, v in cls().to_dict().items() if k not in server}
           for kind, cls in (("pretrain", PretrainConfig), ("eval", EvalConfig), ("distill", DistillConfig),
                             ("finetune", FinetuneConfig))}
    out["pretrain"]["export_bits"] = list(DEFAULT_EXPORT_BITS)
    # fields a preset decides show ours (no preset); an eval's normalization/rounding stay null: the checkpoint's
    out["pretrain"].update({k: v for k, v in PRESETS[None].items() if out["pretrain"].get(k) is None})
    out["eval"].update({k: v for k, v in EVAL_PRESETS[None].items() if out["eval"].get(k) is None})
    out["export"] = {"formats": ["safetensors"], "calibration": None, "calib_percentile": 99.99,  # None: mse, or the evaluation's
                     "ptq": None, "ptq_images": EvalConfig.ptq_images, "ptq_iters": EvalConfig.ptq_iters,  # None: calibrate, or the evaluation's
                     "brecq_learn_act": False}
    return out
