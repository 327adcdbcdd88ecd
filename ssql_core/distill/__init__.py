"""SQAKD: label-free quantization-aware distillation of an SSQL-pretrained model (SPEC 8)."""

from __future__ import annotations

from ssql_core.distill.config import DistillConfig
from ssql_core.distill.run import distill, distill_baselines, load_teacher
from ssql_core.distill.student import STUDENT, Student, load_student, save_student

__all__ = ["STUDENT", "DistillConfig", "Student", "distill", "distill_baselines", "load_student", "load_teacher", "save_student"]
