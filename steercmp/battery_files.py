"""Where experiment and battery files are found: the shipped ``experiments/`` folder (source
tree or installed package), shipped battery short names (``battery: note8``), and paths
relative to the experiment file's folder."""

from __future__ import annotations

import re
from pathlib import Path

from steercmp.errors import ConfigError

PACKAGE_EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def _base_dir(source: str) -> Path:
    return Path(source).resolve().parent if source.endswith((".yaml", ".yml")) else Path.cwd()


def _resolve(source: str, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else _base_dir(source) / p


#: ``battery: note8`` (no slash, no suffix) names a shipped battery, experiments/batteries/note8.yaml
_SHORT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def is_battery_short_name(name: str) -> bool:
    return bool(_SHORT_NAME.fullmatch(name))


def shipped_batteries() -> tuple[str, ...]:
    """The short names of the batteries shipped in ``experiments/batteries`` (source tree or package)."""
    return tuple(sorted(p.stem for p in (experiments_dir() / "batteries").glob("*.yaml")))


def _shipped_list() -> str:
    return ", ".join(shipped_batteries()) or "none found"


def _battery_file(source: str, name: str) -> Path:
    if is_battery_short_name(name):
        return experiments_dir() / "batteries" / f"{name}.yaml"
    return _resolve(source, name)


def resolve_battery(source: str, name: str) -> Path:
    """The battery file an experiment's ``battery`` names: a shipped short name (``note8``) or a
    path, relative to the experiment file's folder; a one-line error when there is none."""
    path = _battery_file(source, name)
    if is_battery_short_name(name):
        if name not in shipped_batteries():
            raise ConfigError(f"{name!r} is not a shipped battery (shipped: {_shipped_list()})",
                              where=f"{source}: battery",
                              fix=f"use a shipped name, or a path to your battery file (e.g. ./{name}.yaml)")
        return path
    if not path.exists():
        relative = not Path(name).expanduser().is_absolute()
        folder = "the experiment file's folder" if source.endswith((".yaml", ".yml")) else "the current folder"
        note = f" (relative paths resolve against {folder}, {_base_dir(source)})" if relative else ""
        raise ConfigError(f"battery file {path} not found{note}", where=f"{source}: battery",
                          fix=f"check the path, or name a shipped battery ({_shipped_list()}), e.g. battery: note8")
    return path


def experiments_dir() -> Path:
    """The shipped ``experiments/`` folder: the source tree's, or the installed package's
    (``steercmp_experiments``)."""
    if (PACKAGE_EXPERIMENTS / "embedded.yaml").exists():
        return PACKAGE_EXPERIMENTS
    try:
        import steercmp_experiments
    except ImportError:
        return PACKAGE_EXPERIMENTS
    return Path(steercmp_experiments.__file__).resolve().parent


def default_experiment_path() -> Path:
    """``experiments/embedded.yaml`` from the source tree, or the copy shipped in the package."""
    candidate = experiments_dir() / "embedded.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError("the default experiment file is missing", where="experiments/embedded.yaml",
                      fix="pass an experiment YAML explicitly")


__all__ = ["default_experiment_path", "experiments_dir", "is_battery_short_name", "resolve_battery",
           "shipped_batteries"]
