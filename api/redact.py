"""No server file path in what the API answers (docs/decisions/014).

Library messages name files for the people who run it locally (``dataset``: "not found under
/srv/data/cifar10"; a corrupt checkpoint names its file; a crash's last log line may be a
traceback line). Over HTTP the same text goes to users who have no business knowing the server's
layout, so every error text the API answers passes :func:`redact`: the server's own folders
become names a user can act on (``<data_root>`` is ``SSQL_DATA_ROOT``, ``<artifacts>``), and any
other absolute path keeps only its last part (``<server>/last.pt``; a source file of the server's
code, as in a traceback line, none: ``<server>``).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path
from typing import Any

#: (absolute folder, what the answer calls it), longest first
_ROOTS: list[tuple[str, str]] = []
#: an absolute POSIX path of two or more parts, not part of a URL (``http://host/x``) or a word
_ABS_PATH = re.compile(r"(<[a-z_]+>)?(?<![\w:/.~-])/(?:[^\s/'\"`,;:()\[\]{}<>]+/)+([^\s/'\"`,;:()\[\]{}<>]*)")


def set_roots(roots: dict[str, Path]) -> None:
    """Name the server's folders (label -> folder); the interpreter's and the code's come along."""
    named = {str(Path(p)): label for label, p in roots.items()}
    code = Path(__file__).resolve().parents[1]
    for label, p in (("<server>", code), ("<python>", Path(sys.prefix)), ("<python>", Path(sys.base_prefix)),
                     ("<tmp>", Path(tempfile.gettempdir()))):
        named.setdefault(str(p), label)
    _ROOTS[:] = sorted(((p, label) for p, label in named.items() if p not in ("/", "")), key=lambda x: -len(x[0]))


def redact(text: Any) -> Any:
    """``text`` with server paths replaced (anything that is not a string is returned as is)."""
    if not isinstance(text, str) or "/" not in text:
        return text
    for root, label in _ROOTS:
        text = text.replace(root, label)
    return _ABS_PATH.sub(_shorten, text)


def _shorten(m: re.Match[str]) -> str:
    """``<label>/last-part``; the server's source files (a traceback line) only as ``<label>``."""
    label, last = m.group(1) or "<server>", m.group(2)
    return label if last.endswith((".py", ".pyc", ".so")) else f"{label}/{last}"
