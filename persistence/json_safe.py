"""JSON that every database accepts: non-finite floats become ``null``.

Python's ``json`` writes NaN and Infinity as bare ``NaN`` / ``Infinity`` tokens, which are not
JSON: Postgres rejects the whole statement (``invalid input syntax for type json``), and
Starlette refuses to render them (``allow_nan=False``). A diverging loss or a corrupt checkpoint
can put such values into progress, metrics, summaries or result rows, so every writer of those
columns passes its value through :func:`finite_json` first (docs/decisions/008).
"""

from __future__ import annotations

import math
from typing import Any


def finite_float(value: Any) -> Any:
    """``value`` unless it is a non-finite float (NaN, +-Infinity), which becomes None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def finite_json(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, scalars) with NaN/Infinity as None.

    Values that are not JSON types are returned as they are (the column's serialiser decides).
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value
