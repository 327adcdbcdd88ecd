"""Schemathesis hooks of ``bench/fuzz_api.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

One check replaces ``positive_data_acceptance`` (ST202, "a schema-valid request must be
accepted"): the same check, except that a 422 is accepted when every error it names is

* a ``source_job`` (body) that is not one of the caller's succeeded jobs of the right kind: no
  schema can state that a referenced job exists and has succeeded, so the fuzzer's random (or
  example) ids are refused for a reason the schema cannot express;
* a body field that no request schema declares: the request schemas allow additional
  properties because a pretrain request takes its method's options at the top level (``ema``,
  ``temperature``, ...), which depend on ``method``; the schema does not list them per method
  (yet), so a random extra field is refused as unknown (or its value out of the option's range);
  the same holds for the keys of ``method_options`` (a free-form object in the schema);
* a ``w_bits`` / ``a_bits`` pair whose low end is above its high end: JSON Schema cannot order
  the items of an array (each item's range is stated);
* ``devices`` that do not divide ``batch_size`` (given or the default): a relation between two
  fields, which JSON Schema cannot state;
* a dataset registration's ``uri`` (``POST /v1/datasets`` with ``{"name", "uri"}``) that does not
  name readable data in a bucket this server may read (or a server whose store is not S3): no
  schema can state what a bucket holds;
* an integer field sent as a number with a zero fraction (``3.0``): the API takes integers
  written as integers only (README; ``api.schemas.INTEGER_RULE``), which JSON Schema 2020-12
  cannot state (it calls 3.0 an integer), so the document says it in words
  (docs/decisions/014); the 422's ``type`` is ``int_spelling``.

Any other 422 of a schema-valid request still fails the run.
"""

from __future__ import annotations

import json

import schemathesis
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

#: the API's own messages for a source_job that is unknown / of another kind, or not succeeded
_REFERENCE_MESSAGES = ("no pretrain job ", "no eval job ", "the pretrain job has not succeeded", "the eval job has not succeeded")


def _declared_body_fields(raw_schema: dict) -> set[str]:
    schemas = raw_schema.get("components", {}).get("schemas", {})
    return {p for name, s in schemas.items() if name.endswith("Request") for p in s.get("properties", {})}


def _excusable(d: object, declared: set[str]) -> bool:
    if not isinstance(d, dict) or not isinstance(d.get("loc"), list):
        return False
    loc = d["loc"]
    if d.get("type") == "int_spelling":
        return True
    if loc == ["body", "source_job"] and str(d.get("msg", "")).startswith(_REFERENCE_MESSAGES):
        return True
    if loc in (["body", "w_bits"], ["body", "a_bits"]) and str(d.get("msg", "")).startswith("needs 2 <= low <= high"):
        return True
    if loc == ["body", "devices"] and "must be a multiple of devices" in str(d.get("msg", "")):
        return True
    if loc == ["body", "uri"]:  # a registration's data: what a bucket holds is no schema's to state
        return True
    return len(loc) >= 2 and loc[0] == "body" and isinstance(loc[1], str) and (loc[1] not in declared or loc[1] == "method_options")


def _only_excusable(body: bytes | str | None, declared: set[str]) -> bool:
    try:
        detail = json.loads(body or b"").get("detail")
    except (ValueError, AttributeError):
        return False
    return isinstance(detail, list) and bool(detail) and all(_excusable(d, declared) for d in detail)


@schemathesis.check
def positive_data_acceptance_but_references(ctx, response, case):  # type: ignore[no-untyped-def]
    """ST202, except a 422 that only refuses an unknown or unfinished ``source_job`` or an
    undeclared (method option) field."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        declared = _declared_body_fields(case.operation.schema.raw_schema)
        if response.status_code == 422 and _only_excusable(response.content, declared):
            return None
        raise
