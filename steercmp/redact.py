"""Secret redaction, in one place: error messages, config snapshots and manifests all use it.

A credential never reaches a file or a terminal: values of secret-looking environment variables
(``HF_TOKEN``, ``*_API_KEY``...), values under secret-looking keys, and token-shaped strings
(``hf_...``, ``sk-...``, ``ghp_...``) are replaced by ``<redacted>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
#: names (environment variables, mapping keys) whose values are secrets
SECRET_NAME = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|auth)", re.IGNORECASE)
#: strings shaped like a credential wherever they appear
SECRET_SHAPE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|ghp_[A-Za-z0-9]{20,})\b")


def redact_text(text: str) -> str:
    """``text`` without secret environment values or token-shaped strings."""
    for name, value in os.environ.items():
        if len(value) >= 6 and SECRET_NAME.search(name):
            text = text.replace(value, REDACTED)
    return SECRET_SHAPE.sub(REDACTED, text)


def redact(obj: Any) -> Any:
    """A JSON-like object with secrets replaced: values under secret-looking keys, and every
    string passed through :func:`redact_text`."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if isinstance(k, str) and SECRET_NAME.search(k) and isinstance(v, str)
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


__all__ = ["REDACTED", "SECRET_NAME", "SECRET_SHAPE", "redact", "redact_text"]
