"""What this library accepts: datasets, backbones, methods, bit-widths and limits (for UIs/APIs)."""

from __future__ import annotations

from typing import Any

from ssql_core.bits import ACCEPTED_FORMS, MAX_BITS, MIN_BITS, PAPER_BITS
from ssql_core.config import (
    CALIBRATIONS,
    EVAL_PRESETS,
    INTERPOLATIONS,
    MAX_BATCH,
    MAX_EPOCHS,
    PRESETS,
    PROBES,
    PTQ_MAX_IMAGES,
    PTQ_MAX_ITERS,
    PTQ_METHODS,
    QUANT_BEHAVIOURS,
    TRAINING_BEHAVIOURS,
    EvalConfig,
)
from ssql_core.data import DATASET_NAMES
from ssql_core.finetune import ACT_RANGES, FinetuneConfig
from ssql_core.methods import METHODS
from ssql_core.mixed_precision.allocation import SOLVERS
from ssql_core.mixed_precision.autobit import BUDGETS, AutobitConfig
from ssql_core.mixed_precision.autobit import MAX_IMAGES as AUTOBIT_MAX_IMAGES
from ssql_core.mixed_precision.autobit import MAX_SAMPLES as AUTOBIT_MAX_SAMPLES
from ssql_core.mixed_precision.sensitivity import SENSITIVITIES
from ssql_core.models import BACKBONES


def catalog() -> dict[str, Any]:
    return {
        "datasets": list(DATASET_NAMES),
        "backbones": sorted(BACKBONES),
        "methods": {name: {"quantized": cls.quantized, "options": dict(cls.default_options)} for name, cls in sorted(METHODS.items())},
        "bits": {"paper_set": list(PAPER_BITS), "min": MIN_BITS, "max": MAX_BITS, "forms": ACCEPTED_FORMS},
        "eval_protocols": ["linear", "knn"],
        "eval_paths": ["cached", "augmented"],
        "eval_probes": list(PROBES),
        "calibrations": list(CALIBRATIONS),
        "calib_weights": ["fp", "quantized"],
        "ptq": {"methods": list(PTQ_METHODS), "defaults": {"ptq": EvalConfig.ptq, "ptq_images": EvalConfig.ptq_images,
                                                            "ptq_iters": EvalConfig.ptq_iters, "brecq_learn_act": False},
                "limits": {"ptq_images": [1, PTQ_MAX_IMAGES], "ptq_iters": [1, PTQ_MAX_ITERS]}},
        "autobit": {"sensitivities": list(SENSITIVITIES), "solvers": list(SOLVERS), "budgets": list(BUDGETS),
                    "defaults": {k: v for k, v in AutobitConfig().to_dict().items() if k not in BUDGETS},
                    "limits": {"images": [1, AUTOBIT_MAX_IMAGES], "samples": [1, AUTOBIT_MAX_SAMPLES]},
                    "bit_config": "bits also takes per-layer maps {layer: 'NwMa' or {w, a}} naming every weight layer but "
                                  "the 8-bit stem; a map is named mixed-<8 hex digits> in rows and files"},
        "quantizer_behaviours": {k: list(v) for k, v in QUANT_BEHAVIOURS.items()},
        "training_behaviours": {k: list(v) for k, v in TRAINING_BEHAVIOURS.items()},
        "presets": {k: v for k, v in PRESETS.items() if k},
        "eval_presets": {k or "ours": v for k, v in EVAL_PRESETS.items()},
        "eval_interpolations": list(INTERPOLATIONS),
        "finetune": {"act_ranges": list(ACT_RANGES), "defaults": {k: v for k, v in FinetuneConfig().to_dict().items()
                                                                   if k not in ("checkpoint", "data_root", "allow_download", "device", "num_workers")}},
        "limits": {"max_epochs": MAX_EPOCHS, "max_batch_size": MAX_BATCH},
    }
