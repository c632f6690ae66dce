"""User-facing errors: one line that names the file, the field and the fix; the CLI exits 2."""

from __future__ import annotations

from steercmp.redact import redact_text


class SteercmpError(Exception):
    """A problem the user can fix. Printed as one line, no traceback, exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(self.one_line())

    def __reduce__(self) -> tuple:
        """Pickle with ``where`` and ``fix`` (a build process sends its error back whole)."""
        return (_restore, (type(self), self.args, dict(vars(self))))

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


def _restore(cls: type[SteercmpError], args: tuple, state: dict) -> SteercmpError:
    """An unpickled error of any subclass, whatever its ``__init__`` takes."""
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    vars(err).update(state)
    return err
