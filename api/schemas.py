"""Request and response models of API v1 (they are also the OpenAPI documentation).

Request fields default to ``None`` = "use the library's default (SPEC 5/6)"; the real checks are
ssql_core's, applied in :mod:`api.specs`. Extra keys on a pretrain request are method options.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

#: request numbers are strict: a bool is not a number, "3" is not an integer, and neither is 3.0
#: nor 3.5 (README: integers are written as integers); an integer is accepted where a number is
#: expected. Numbers must be finite (NaN / Infinity are no JSON, and no run can use them).
#: JSON Schema 2020-12 (what OpenAPI 3.1 speaks) cannot tell 3.0 from 3, so the document states
#: this rule in words (:data:`INTEGER_RULE`, docs/decisions/014).
INTEGER_RULE = "integers are written without a fraction or exponent: 3, not 3.0 or 3e0 (422 naming the field)"


def _no_float_integers(value: Any) -> Any:
    if type(value) is float:
        raise PydanticCustomError("int_spelling", "must be an integer written without a fraction or exponent "
                                  "(3, not 3.0), got {value}", {"value": value})
    return value


def _ascii_bits(value: Any) -> Any:
    """Bit-widths are ASCII: ``"４w４a"`` (full-width digits) is refused here, before any source job
    is looked up; the rest of the notation is ``ssql_core.bits.parse_bits``' (which refuses it too)."""
    if isinstance(value, str) and not value.isascii():
        raise PydanticCustomError("bits_ascii", "a bit-width is ASCII letters and digits such as '4w4a'; "
                                  "{value} holds other characters (full-width digits?)", {"value": value})
    return value


Int = Annotated[int, BeforeValidator(_no_float_integers), Field(strict=True)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Bool = Annotated[bool, Field(strict=True)]

#: bit-width strings as the schema states them: "fp" or "{w}w{a}a" with w, a in 2..8 (the server
#: also takes a few spellings more, e.g. "4W4A", "4w4f"; the schema names the canonical ones)
BITS_PATTERN = "^(fp|[2-8]w[2-8]a)$"
QUANT_BITS_PATTERN = "^[2-8]w[2-8]a$"
#: the label of a per-layer configuration (ssql_core.bitconfig.LABEL_PATTERN)
MIXED_LABEL_PATTERN = "^mixed-[0-9a-f]{8}$"
BitsStr = Annotated[str, BeforeValidator(_ascii_bits), Field(json_schema_extra={"pattern": BITS_PATTERN})]
#: one bit-width field (pretrain QAT baselines, distill, finetune): ASCII, checked before anything else
OneBits = Annotated[str | None, BeforeValidator(_ascii_bits)]
#: a dataset name as the schema states it (ssql_core.data.DATASET_NAMES); whether its files are
#: on this server (or may be downloaded) is the server's answer (422 naming ``dataset``)
DATASET_PATTERN = r"^(digits|synthetic|fashion_mnist|mnist|cifar10|cifar100|imagefolder:(?!.*\\.\\.)[A-Za-z0-9][A-Za-z0-9._-]{0,127})$"
#: a job id as the schema states it (printable ASCII, at most 36 characters: a uuid as returned at
#: submission); not enforced here: any other string is "no such job of yours", a 422 naming it
JobIdStr = Annotated[str, Field(json_schema_extra={"maxLength": 36, "pattern": "^[ -~]{1,36}$"})]
#: the formats of an export job (``ssql_core.export.api.FORMATS``; not imported: that loads torch)
EXPORT_FORMATS = ("safetensors", "onnx", "torchvision")


def _range(lo: float, hi: float, **kw: Any) -> Any:
    """An optional field's documented range (the library checks it, 422 naming the field: the
    schema only states it). Server limits below the library's are filled in per server by
    :func:`api.app.openapi_with_limits` (``SSQL_MAX_EPOCHS`` etc.)."""
    extra = {"minimum": lo, "maximum": hi, **kw.pop("json_schema_extra", {})}
    return Field(None, json_schema_extra=extra, **kw)


_PAIR = {"minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 2, "maximum": 8}}


#: a tag: a letter or digit, then up to 63 of letters, digits and _ . : / = + - @ # (no spaces, no markup)
TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/=+\-@#]{0,63}$"
MAX_TAGS = 20
#: a name or notes: printable text (no control characters except, in notes, newlines and tabs)
NAME_PATTERN = r"^[^\x00-\x1f\x7f]*$"
NOTES_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def _matching(pattern: str, what: str) -> AfterValidator:
    """The schema states ``pattern``; a value off it gets a readable 422 (not the regex itself)."""
    rule = re.compile(pattern)

    def check(value: str) -> str:
        if not rule.match(value):
            raise PydanticCustomError("label_pattern", what)
        return value

    return AfterValidator(check)


Tag = Annotated[str, Field(json_schema_extra={"pattern": TAG_PATTERN}),
                _matching(TAG_PATTERN, "a tag is 1 to 64 of letters, digits and _ . : / = + - @ #, starting with a letter "
                          "or digit (no spaces, no markup)")]
Name = Annotated[str, Field(max_length=200, json_schema_extra={"pattern": NAME_PATTERN}),
                 _matching(NAME_PATTERN, "a name must not contain control characters (newlines, tabs, NUL)")]
Notes = Annotated[str, Field(max_length=10_000, json_schema_extra={"pattern": NOTES_PATTERN}),
                  _matching(NOTES_PATTERN, "notes must not contain control characters other than newlines and tabs")]


#: an owner's order of their own queued jobs (persistence/fair_share.py; decision 019)
Priority = Annotated[int, Field(strict=True, ge=-100, le=100), BeforeValidator(_no_float_integers)]


class JobLabels(BaseModel):
    """The owner's words for a job, on every kind: set at submit, edited with ``PATCH /v1/jobs/{id}``."""

    name: Name | None = Field(None, description="a name for the job, up to 200 characters")
    tags: list[Tag] | None = Field(None, max_length=MAX_TAGS, description=f"up to {MAX_TAGS} tags, each up to 64 "
                                   "characters: letters, digits and _ . : / = + - @ # (e.g. 'sweep:lr', 'paper')")
    notes: Notes | None = Field(None, description="free text, up to 10,000 characters")
    priority: Priority | None = Field(None, description="the order of your own queued jobs: higher "
                                 "starts first (-100 to 100, default 0). Between owners the fair share decides: "
                                 "the owner using the fewest devices, then the least device-time lately, goes first")


class JobPatch(JobLabels):
    """``PATCH /v1/jobs/{id}``: the fields given are set (``null`` clears name or notes, sets priority back to 0;
    ``[]`` clears tags). A queued job's new priority applies to the next start."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"name": "ssql r18 cifar10", "tags": ["paper"]}})


class PretrainRequest(JobLabels):
    """Self-supervised pretraining (SSQL or a baseline)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {"kind": "pretrain", "method": "ssql", "backbone": "resnet18", "dataset": "digits", "epochs": 20}
        },
    )

    kind: Literal["pretrain"]
    method: str | None = None
    backbone: str | None = None
    dataset: str | None = Field(None, description="digits, synthetic, fashion_mnist, mnist, cifar10, cifar100 or imagefolder:<name>",
                                json_schema_extra={"pattern": DATASET_PATTERN})
    epochs: Int | None = _range(1, 10_000)
    batch_size: Int | None = _range(2, 65_536)
    lr: Number | None = _range(1e-8, 100.0)
    weight_decay: Number | None = _range(0.0, 1.0)
    momentum: Number | None = _range(0.0, 0.9999)
    seed: Int | None = _range(0, 2**31 - 1)
    image_size: Int | None = _range(8, 1024)
    preset: Literal["reference"] | None = Field(
        None, description="'reference': the authors' code's behaviours (weight_scale_grad attached, rounding divide, "
        "init pytorch, normalization reference, drop_last false, lr_step epoch); a field given explicitly wins")
    weight_scale_grad: Literal["detached", "attached"] | None = Field(None, description="default detached")
    rounding: Literal["reciprocal", "divide"] | None = Field(None, description="x * (1/s) (default) or x / s")
    init: Literal["torchvision", "pytorch"] | None = Field(None, description="default torchvision (kaiming-normal)")
    normalization: Literal["standard", "reference"] | None = Field(
        None, description="standard (default): the dataset's measured mean/std; reference: the reference code's CIFAR-10 std")
    drop_last: bool | None = Field(None, description="drop an epoch's last partial batch (default true; the reference keeps it)")
    lr_step: Literal["step", "epoch"] | None = Field(None, description="cosine lr moved every step (default) or once per epoch (the reference)")
    width: Number | None = _range(0.03125, 4.0)
    max_samples: Int | None = _range(2, 10**9)
    w_bits: list[Int] | None = Field(None, description="[low, high], 2 <= low <= high <= 8", json_schema_extra=_PAIR)
    a_bits: list[Int] | None = Field(None, description="[low, high], 2 <= low <= high <= 8", json_schema_extra=_PAIR)
    bits: OneBits = Field(None, description="fixed bit-width of fixed-bit QAT baselines, e.g. 4w4a",
                              json_schema_extra={"pattern": QUANT_BITS_PATTERN})
    stem: str | None = Field(None, json_schema_extra={"enum": ["auto", "cifar", "imagenet", None]})
    amp: Bool | None = None
    channels_last: Bool | None = None
    compile: Bool | None = None
    input_pipeline: Literal["auto", "device", "loader"] | None = Field(
        None, description="where the augmented views are made: device (batched, on the GPU; in-memory datasets), "
        "loader (per image, DataLoader workers); auto (default): device on CUDA for in-memory datasets")
    devices: Int | None = Field(None, description="GPUs of this job (one process each, DistributedDataParallel; "
                                "gloo CPU processes on a worker without GPUs); batch_size is the global batch, "
                                "a multiple of devices; at most the server's max_devices", json_schema_extra={"minimum": 1})
    sync_bn: Bool | None = Field(None, description="SyncBatchNorm across the devices (CUDA only)")
    checkpoint_every_steps: Int | None = Field(None, json_schema_extra={"minimum": 1})
    method_options: dict[str, Any] | None = None
    export_bits: list[BitsStr] | None = Field(
        None,
        description="packed safetensors checkpoints written after training; default the paper's set "
        "fp, 8w8a, 6w6a, 5w5a, 4w4a, 3w3a, 2w8a, 2w4a; [] for none",
        json_schema_extra={"uniqueItems": True},  # a repeat is a 422 (api.specs.bits_list)
    )


#: one entry of a ``bits`` list as the schema states it: a bit-width, or a per-layer map
BITS_ITEM_SCHEMA = {"anyOf": [
    {"type": "string", "pattern": BITS_PATTERN},
    {"type": "object", "minProperties": 1, "propertyNames": {"pattern": "^[A-Za-z0-9_.]{1,200}$"}, "additionalProperties": {"anyOf": [
        {"type": "string", "pattern": QUANT_BITS_PATTERN},
        {"type": "object", "required": ["w", "a"], "additionalProperties": False,
         "properties": {"w": {"type": "integer", "minimum": 2, "maximum": 8}, "a": {"type": "integer", "minimum": 2, "maximum": 8}}}]}},
]}


class AutobitRequest(BaseModel):
    """Per-layer weight bits for a budget (HAWQ-style; ssql_core.mixed_precision.autobit, decision 020)."""

    model_config = ConfigDict(extra="forbid")

    budget_bits: Number | None = Field(None, description="average weight bits over the layers (the 8-bit stem aside), weighted "
                                       "by parameters; uniform 4w4a is 4.0", json_schema_extra={"exclusiveMinimum": 0, "maximum": 32})
    budget_bytes: Int | None = _range(1, 10**18, description="model size: the packed file's tensors (weights at their bits, BN, "
                                      "scales, ranges); instead of budget_bits")
    budget_bops: Int | None = _range(1, 10**18, description="optional: bit operations per image (MACs x weight bits x input bits)")
    sensitivity: Literal["hessian", "quant_error"] | None = Field(
        None, description="hessian (default: Hutchinson trace of the FP probe's cross-entropy x quantization perturbation) or "
        "quant_error (features' MSE with one layer quantized)")
    solver: Literal["milp", "greedy"] | None = Field(None, description="milp (default, exact: scipy.optimize.milp) or greedy")
    candidates: list[Int] | None = Field(None, description="weight bits to choose from (default [2, 3, 4, 6, 8])",
                                         json_schema_extra={"minItems": 1, "maxItems": 7, "uniqueItems": True,
                                                            "items": {"type": "integer", "minimum": 2, "maximum": 8}})
    a_bits: Int | None = _range(2, 8, description="activation bits of every layer (default 8; the stem stays at 8)")
    images: Int | None = _range(1, 8192, description="sensitivity images (default 256)")
    samples: Int | None = _range(1, 1024, description="Hutchinson vectors per batch (default 16)")


class EvalRequest(JobLabels):
    """Evaluation of a finished pretrain job at several bit-widths."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {"kind": "eval", "source_job": "<pretrain job id>", "bits": ["fp", "8w8a", "4w4a", "2w4a"]}
        },
    )

    kind: Literal["eval"]
    source_job: JobIdStr
    bits: list[Annotated[Any, BeforeValidator(_ascii_bits)]] | None = Field(
        None, description="bit-widths ('fp', '4w4a') and per-layer maps ({layer: '4w8a' or {w, a}}, naming every weight layer "
        "of the backbone but the 8-bit stem; decision 020)",
        json_schema_extra={"minItems": 1, "uniqueItems": True, "items": BITS_ITEM_SCHEMA})
    protocol: Literal["linear", "knn"] | None = None
    path: str | None = Field(None, json_schema_extra={"enum": ["cached", "augmented", None]})
    dataset: str | None = Field(None, json_schema_extra={"pattern": DATASET_PATTERN})
    epochs: Int | None = _range(1, 10_000)
    batch_size: Int | None = _range(1, 65_536)
    lr: Number | None = _range(1e-8, 1000.0)
    weight_decay: Number | None = _range(0.0, 1.0)
    momentum: Number | None = _range(0.0, 0.9999)
    lr_milestones: list[Number] | None = Field(None, json_schema_extra={
        "minItems": 2, "maxItems": 2, "items": {"type": "number", "minimum": 0.0, "maximum": 1.0}})
    preset: Literal["paper", "reference"] | None = Field(
        None, description="defaults of calibration, calib_images, probe, lr, interpolation, normalization: none = ours "
        "(mse, 128, bn, 0.1, bilinear), paper = SPEC 6 (minmax, 128, linear, 30, bilinear), reference = the authors' "
        "evaluation code (reference, 512, linear, 30, bicubic, its CIFAR-10 std); a field given explicitly wins")
    calib_images: Int | None = _range(1, 10**7)
    calibration: Literal["minmax", "reference", "percentile", "mse"] | None = Field(
        None, description="activation ranges: mse (default: least quantization MSE per point), minmax (the paper), "
        "reference (one augmented training batch), percentile (calib_percentile per point)")
    interpolation: Literal["bilinear", "bicubic"] | None = Field(
        None, description="the eval resize: bilinear (default) or bicubic (the reference)")
    normalization: Literal["standard", "reference"] | None = Field(
        None, description="standard or reference (its CIFAR-10 std); default: what the checkpoint was pretrained with")
    rounding: Literal["reciprocal", "divide"] | None = Field(
        None, description="the quantizer's rounding, x * (1/s) or x / s; default: the checkpoint's own")
    calib_percentile: Number | None = _range(50.0, 100.0, description="percentile calibration's percentile, 50-100 (default 99.99)")
    calib_weights: Literal["fp", "quantized"] | None = Field(
        None, description="ranges recorded on the FP network (default) or with the weights already quantized")
    probe: Literal["linear", "bn"] | None = Field(
        None, description="bn (default): a parameter-free BatchNorm before the linear layer, or linear (the paper)")
    ptq: Literal["calibrate", "adaround", "brecq"] | None = Field(
        None, description="post-training quantization: calibrate (default, the paper), adaround (learned rounding per layer), "
        "brecq (per residual block, Fisher-weighted)")
    ptq_images: Int | None = _range(1, 8192, description="reconstruction images (default 1024)")
    ptq_iters: Int | None = _range(1, 100_000, description="reconstruction iterations per layer / block (default 2000)")
    brecq_learn_act: Bool | None = Field(None, description="brecq: also learn activation step sizes (LSQ-style)")
    autobit: AutobitRequest | None = Field(
        None, description="choose weight bits per layer for a budget and evaluate that configuration as one more row (named "
        "mixed-..., with its map): e.g. {'budget_bits': 4.0}")
    knn_k: Int | None = _range(1, 10**5)
    knn_t: Number | None = _range(1e-4, 10.0)
    seed: Int | None = _range(0, 2**31 - 1)
    max_samples: Int | None = _range(2, 10**9)


class DistillRequest(JobLabels):
    """SQAKD: label-free distillation of the FP model (an eval job's "fp" head) into one bit-width."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {"kind": "distill", "source_job": "<eval job id>", "bits": "4w4a", "quantizer": "psq", "epochs": 10}
        },
    )

    kind: Literal["distill"]
    source_job: JobIdStr = Field(description="a succeeded eval job (linear protocol) whose bits include 'fp'")
    bits: OneBits = Field(None, description="the student's bit-width, e.g. 4w4a",
                              json_schema_extra={"pattern": QUANT_BITS_PATTERN})
    quantizer: str | None = Field(None, description="psq, pact, lsq, dorefa or ewgs",
                                   json_schema_extra={"enum": ["psq", "pact", "lsq", "dorefa", "ewgs", None]})
    dataset: str | None = Field(None, json_schema_extra={"pattern": DATASET_PATTERN})
    epochs: Int | None = _range(1, 10_000)
    batch_size: Int | None = _range(2, 65_536)
    lr: Number | None = _range(1e-8, 10.0)
    quantizer_lr: Number | None = _range(0.0, 10.0)
    weight_decay: Number | None = _range(0.0, 1.0)
    temperature: Number | None = _range(0.05, 100.0)
    ce_weight: Number | None = _range(0.0, 100.0)
    bn: str | None = Field(None, json_schema_extra={"enum": ["recalibrate", "frozen", "train", None]})
    calib_images: Int | None = _range(1, 10**7)
    max_samples: Int | None = _range(2, 10**9)
    seed: Int | None = _range(0, 2**31 - 1)


class ExportRequest(JobLabels):
    """Files of a finished job at more bit-widths / formats (``POST /v1/jobs/{id}/exports``)."""

    model_config = ConfigDict(
        extra="allow",
        # unknown fields are refused (422 naming them, in api.specs.export_spec): the schema says so
        json_schema_extra={"example": {"bits": ["4w4a", "2w4a"], "formats": ["safetensors", "onnx"]},
                           "additionalProperties": False},
    )

    bits: list[Annotated[Any, BeforeValidator(_ascii_bits)]] = Field(
        description="bit-widths, per-layer maps, or (from an eval job) the label of a map it evaluated (mixed-...)",
        json_schema_extra={"minItems": 1, "maxItems": 50, "uniqueItems": True,
                           "items": {"anyOf": [*BITS_ITEM_SCHEMA["anyOf"], {"type": "string", "pattern": MIXED_LABEL_PATTERN}]}})
    formats: list[Any] | None = Field(None, description="default ['safetensors']",
                                      json_schema_extra={"minItems": 1, "uniqueItems": True,
                                                         "items": {"type": "string", "enum": list(EXPORT_FORMATS)}})
    calibration: Literal["minmax", "reference", "percentile", "mse"] | None = Field(
        None, description="activation range rule of the files (default: minmax, or the source evaluation's)")
    calib_percentile: Number | None = _range(50.0, 100.0)
    ptq: Literal["calibrate", "adaround", "brecq"] | None = Field(
        None, description="reconstruction of the files' rounding (default calibrate; from an eval job: the evaluation's)")
    ptq_images: Int | None = _range(1, 8192)
    ptq_iters: Int | None = _range(1, 100_000)
    brecq_learn_act: Bool | None = None
    onnx_form: Literal["integer", "qlinear", "storage"] | None = Field(
        None, description="the ONNX files' graph (with 'onnx' in formats; default integer): integer runs the convs as "
        "ConvInteger, the evaluated model up to float rounding; qlinear also fuses each block's first conv into "
        "QLinearConv (faster on large models, its rounded bias moves top-1 slightly); storage keeps every conv in float "
        "(smallest file). Measured in docs/RESULTS.md")


class FinetuneRequest(JobLabels):
    """Supervised quantization-aware fine-tuning of a finished pretrain job at one bit-width."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {"kind": "finetune", "source_job": "<pretrain job id>", "bits": "4w4a", "quantizer": "psq", "epochs": 20}
        },
    )

    kind: Literal["finetune"]
    source_job: JobIdStr = Field(description="a succeeded pretrain job")
    dataset: str | None = Field(None, description="default: the pretrain job's; another dataset is a transfer (its classes set the head)",
                                json_schema_extra={"pattern": DATASET_PATTERN})
    bits: OneBits = Field(None, description="the bit-width trained and deployed, e.g. 4w4a; fp allowed (default 4w4a)",
                              json_schema_extra={"pattern": BITS_PATTERN})
    quantizer: Literal["psq", "pact", "lsq", "dorefa", "ewgs"] | None = None
    act_ranges: Literal["frozen", "update"] | None = Field(
        None, description="frozen (default): activation ranges fixed after calibration (SPEC 6); update: trained / running")
    epochs: Int | None = None
    batch_size: Int | None = None
    lr: Number | None = None
    head_lr: Number | None = None
    head_init: Literal["probe", "random"] | None = Field(
        None, description="probe (default): the head starts as the PTQ + linear baseline's probe; random: a new head")
    quantizer_lr: Number | None = None
    weight_decay: Number | None = None
    momentum: Number | None = None
    lr_milestones: list[Number] | None = None
    crop_scale: list[Number] | None = None
    calib_images: Int | None = None
    baseline_epochs: Int | None = None
    test_every_epochs: Int | None = None
    max_samples: Int | None = None
    seed: Int | None = None
    checkpoint_every_steps: Int | None = None


JobRequest = Annotated[PretrainRequest | EvalRequest | DistillRequest | FinetuneRequest, Field(discriminator="kind")]


class ProgressOut(BaseModel):
    phase: str | None = None
    fraction: float = 0.0
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    total_steps: int | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    loss: float | None = None
    lr: float | None = None


class ErrorOut(BaseModel):
    code: str
    message: str
    field: str | None = None


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    spec: dict[str, Any]
    source_job: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    progress: ProgressOut
    summary: dict[str, Any] | None
    error: ErrorOut | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    name: str | None = None
    tags: list[str] = []
    notes: str | None = None
    priority: int = 0


class JobPage(BaseModel):
    items: list[JobOut]
    next_offset: int | None


class MetricOut(BaseModel):
    id: int
    attempt: int
    phase: str
    epoch: int
    step: int
    loss: float | None
    lr: float | None
    images_per_s: float | None
    metrics: dict[str, Any] | None
    at: datetime


class MetricPage(BaseModel):
    items: list[MetricOut]
    next_after: int | None
    #: with ``max_points``: how many samples the items stand for (the whole history after ``after``)
    downsampled_from: int | None = None


class ResultRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    bits: str
    protocol: str
    top1: float | None


class ResultsOut(BaseModel):
    job_id: str
    status: str
    rows: list[ResultRow]


class CheckpointOut(BaseModel):
    bits: str
    format: str
    bytes: int
    sha256: str
    url: str
    produced_by: str | None = Field(None, description="the export job that wrote this file, if not this job")
    created_at: datetime


class LineageNode(BaseModel):
    """One job of a chain: enough to link to it and say what it is."""

    id: str
    kind: str
    status: str
    name: str | None
    tags: list[str]
    source_job: str | None = Field(description="the job it was made from")
    what: str = Field(description="what it ran, in a few words, e.g. 'ssql · resnet18 · cifar10' or 'eval fp,4w4a · mse · bn probe'")
    created_at: datetime
    finished_at: datetime | None
    depth: int | None = Field(None, description="in `tree`: how far below the chain's first job")


class LineageOut(BaseModel):
    """``GET /v1/jobs/{id}/lineage``: the job's chain, only your own jobs."""

    job_id: str
    parents: list[LineageNode] = Field(description="the jobs it was made from, its source first (a distill: its eval, then the pretrain)")
    children: list[LineageNode] = Field(description="the jobs made straight from it, oldest first")
    tree: list[LineageNode] = Field(description="the whole chain from its first job, depth-first (a job, then the jobs made from it)")
    truncated: bool = Field(description="the chain holds more jobs than were listed")


class ReproduceOut(BaseModel):
    """``GET /v1/jobs/{id}/reproduce``: the request that makes the job again (the same spec)."""

    job_id: str
    kind: str
    source_job: str | None
    method: Literal["POST"]
    path: str = Field(description="where to send it: /v1/jobs, or /v1/jobs/{source}/exports for an export")
    request: dict[str, Any] = Field(description="every field of the spec, as a request body")
    minimal: dict[str, Any] = Field(description="the fields that differ from the library's defaults (the same spec)")
    cli: str = Field(description="the `ssql submit` command of `minimal`")
    cli_from: str = Field(description="`ssql submit --from ID`: the same, read from this server (add --set k=v to change a field)")
