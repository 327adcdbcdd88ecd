"""Change fields of a request body by dotted name (``ssql submit --from JOB --set k=v``, ``Client.clone``).

``epochs=5`` sets a top-level field; ``method_options.lambda=0.1`` a field of an object field. A
name the job kind does not take is refused before anything is sent, with the closest names
offered (a typo must not silently become a method option the server then refuses, or worse).
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Iterable, Mapping
from typing import Any


class UnknownField(ValueError):
    """A dotted name that the job kind's request does not take."""


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON when it parses (``5``, ``true``, ``["fp","4w4a"]``, ``null``), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``; a missing ``=`` or name is a ValueError."""
    name, eq, value = item.partition("=")
    if not eq or not name.strip():
        raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. epochs=5 or method_options.lambda=0.1")
    return name.strip(), parse_value(value)


def _a(kind: str) -> str:
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def apply(body: Mapping[str, Any], changes: Mapping[str, Any], kind: str, known: Iterable[str] | None = None,
          nested: Mapping[str, Iterable[str]] | None = None) -> dict[str, Any]:
    """A copy of ``body`` with each dotted name of ``changes`` set to its value.

    ``known``: the top-level names a ``kind`` request takes (None: any); ``nested``: for an object
    field, the names it takes (e.g. ``method_options`` -> the method's options). An unknown name,
    or a dotted name through a field that is not an object, raises :class:`UnknownField`."""
    out = copy.deepcopy(dict(body))
    known_set = None if known is None else set(known) | set(body)
    for dotted, value in changes.items():
        parts = dotted.split(".")
        if any(not p for p in parts):
            raise UnknownField(f"{dotted!r} is not a field name (empty part)")
        if known_set is not None and parts[0] not in known_set:
            raise UnknownField(f"unknown field {parts[0]!r} for {_a(kind)} job{_suggest(parts[0], known_set)}; "
                               f"fields: {', '.join(sorted(known_set))}")
        target = out
        for depth, part in enumerate(parts[:-1]):
            inner = target.get(part)
            if inner is None:
                inner = target[part] = {}
            if not isinstance(inner, dict):
                raise UnknownField(f"{'.'.join(parts[:depth + 1])!r} is a {type(inner).__name__}, not an object: "
                                   f"set it whole (--set {'.'.join(parts[:depth + 1])}=...)")
            target = inner
        if len(parts) > 1 and nested and parts[0] in nested and len(parts) == 2:
            allowed = set(nested[parts[0]]) | set(target)
            if parts[1] not in allowed:
                raise UnknownField(f"unknown field {dotted!r} for {_a(kind)} job{_suggest(parts[1], allowed)}; "
                                   f"{parts[0]} takes: {', '.join(sorted(allowed)) or 'nothing'}")
        target[parts[-1]] = value
    return out
