"""User-facing errors: one line that names the file, the field and the fix; the CLI exits 2."""

from __future__ import annotations

import os
import re

_SECRET_ENV = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential|auth)", re.IGNORECASE)
_SECRET_SHAPE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{20,}|ghp_[A-Za-z0-9]{20,})\b")


def redact_text(text: str) -> str:
    """Remove credentials from a message: values of secret-looking environment variables
    (``HF_TOKEN``, ``*_API_KEY``...) and token-shaped strings (``hf_...``, ``sk-...``)."""
    for name, value in os.environ.items():
        if len(value) >= 6 and _SECRET_ENV.search(name):
            text = text.replace(value, "<redacted>")
    return _SECRET_SHAPE.sub("<redacted>", text)


class SteercmpError(Exception):
    """A problem the user can fix. Printed as one line, no traceback, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.where:
            parts.append(f"{self.where}: ")
        parts.append(self.message.rstrip("."))
        if self.fix:
            parts.append(f"; fix: {self.fix.rstrip('.')}")
        return redact_text("".join(parts).replace("\n", " "))


class ConfigError(SteercmpError):
    """A config, battery or checkpoint that fails validation before any model loads."""


class PluginError(SteercmpError):
    """A plugin that failed to register or raised while proposing."""


class NumericalError(SteercmpError):
    """NaN/inf or a zero-norm delta where a norm is required."""
