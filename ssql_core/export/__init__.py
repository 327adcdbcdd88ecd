"""Deployable bit-width-specific checkpoints (SPEC 9): packed safetensors, ONNX QDQ, torchvision.

Entry points: :func:`export_checkpoint` / :func:`export_checkpoints` (from a pretrain run's
``last.pt``), :func:`save_quantized` (from a calibrated in-memory backbone) and
:func:`load_quantized` (file -> module). ONNX files are read with
:func:`ssql_core.export.onnx_graph.read_onnx`, torchvision files with
:func:`ssql_core.export.torchvision_format.load_torchvision`.
"""

from ssql_core.export.api import (
    FORMATS,
    export_checkpoint,
    export_checkpoints,
    fake_quant_reference,
    load_quantized,
    save_quantized,
)
from ssql_core.export.calibration import CalibrationSpec
from ssql_core.export.format import CheckpointError, size_report
from ssql_core.export.quantized import QuantizedModel

__all__ = ["FORMATS", "CalibrationSpec", "CheckpointError", "QuantizedModel", "export_checkpoint",
           "export_checkpoints", "fake_quant_reference", "load_quantized", "save_quantized", "size_report"]
