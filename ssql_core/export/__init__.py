"""Deployable bit-width-specific checkpoints (SPEC 9): packed safetensors, ONNX QDQ, torchvision.

Entry points: :func:`export_checkpoint` (from a pretrain run's ``last.pt``), :func:`save_quantized`
(from a calibrated in-memory backbone) and :func:`load_quantized` (file -> module).
"""

from ssql_core.export.api import (
           FORMATS,
           export_checkpoint,
           fake_quant_reference,
           load_quantized,
           save_quantized,
)
from ssql_core.export.calibration import CalibrationSpec
from ssql_core.export.format import CheckpointError, size_report
from ssql_core.export.quantized import QuantizedModel

__all__ = ["FORMATS", "CalibrationSpec", "CheckpointError", "QuantizedModel", "export_checkpoint",
           "fake_quant_reference", "load_quantized", "save_quantized", "size_report"]
