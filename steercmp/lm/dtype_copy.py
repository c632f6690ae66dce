"""A 16-bit copy of a float32 checkpoint steercmp built itself, written once beside it.

Loading a float32 safetensors file into bf16 reads every float32 page, and they count in resident
memory while the model loads: Gemma 3 270M peaks 1.6 GiB above the process for a 0.5 GiB model.
A bf16 file of the same weights is memory-mapped as it is (0.15 GiB at load; its pages come in as
the model uses them), which is what sets the embedded default's per-stage peaks. The copy holds
the weights the float32 load would cast to (the same ``Tensor.to``), so no result changes.

Only checkpoints inside the steercmp cache get a copy (the embedded model, the mini NLA pair):
a user's checkpoint is never copied. The copy records its source's files (size and mtime), so a
rebuilt source makes a new copy. The copy is written by a fresh process: reading the float32
file and holding the 16-bit tensors peaked 1.1-1.5 GiB above a warm run (the extract stage's and the
AV load's peaks in a cold run), and a child's memory is returned whole when it exits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from steercmp.errors import SteercmpError
from steercmp.lm.build_process import in_fresh_process
from steercmp.lm.embedded import cache_root
from steercmp.paths import build_lock

#: the copy's record of what it was made from
MARKER = "steercmp_dtype_copy.json"
COPY_VERSION = 1
_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_matched_checkpoint(source: str | Path, dtype: torch.dtype) -> str | Path:
    """``source`` as given (a folder, or a hub id), or the folder of its ``dtype`` copy (made on
    first use) when ``source`` is a float32 checkpoint in the steercmp cache and ``dtype`` is 16-bit."""
    path = Path(source)
    name = _NAMES.get(dtype)
    weights = sorted(path.glob("*.safetensors")) if name is not None and path.is_dir() else []
    if not weights or not _inside(path, cache_root()) or _stored_dtypes(weights) != {"F32"}:
        return source
    target = path.with_name(f"{path.name}.{name}")
    stamp = {"version": COPY_VERSION, "dtype": name,
             "files": {w.name: [w.stat().st_size, w.stat().st_mtime_ns] for w in weights}}
    if _stamp(target) == stamp:
        return target
    what = f"a {name} copy of {path.name}"
    try:
        with build_lock(target, f"{what} (made once)"):
            if _stamp(target) != stamp:  # else made while this one waited
                # in a fresh process: the float32 pages it reads are not left in the run's memory
                in_fresh_process(what, _write_copy, path, target, weights, dtype, stamp)
    except (SteercmpError, OSError):  # a read-only or full cache: the float32 file still loads
        shutil.rmtree(target.with_name(target.name + ".tmp"), ignore_errors=True)
        return source
    return target


def _write_copy(source: Path, target: Path, weights: list[Path], dtype: torch.dtype, stamp: dict) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in source.iterdir():  # config, tokenizer, metadata: as they are
        if item.is_file() and item.suffix != ".safetensors" and item.name != MARKER:
            shutil.copy2(item, tmp / item.name)
    for w in weights:  # read a tensor at a time (never the whole float32 file); the cast a 16-bit load makes
        with safe_open(str(w), framework="pt") as f:
            tensors = {k: f.get_tensor(k).to(dtype).contiguous() for k in f.keys()}
            save_file(tensors, str(tmp / w.name), metadata=f.metadata())
        del tensors
    (tmp / MARKER).write_text(json.dumps(stamp, indent=2, sort_keys=True))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def _stamp(target: Path) -> dict | None:
    try:
        return json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _stored_dtypes(weights: list[Path]) -> set[str]:
    from safetensors import safe_open

    out: set[str] = set()
    for w in weights:
        with safe_open(str(w), framework="pt") as f:
            out |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return out


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies in ``root``, as written or with links resolved (a cache folder may
    be a link to another disk)."""
    for a, b in ((path.absolute(), root.absolute()), (path.resolve(), root.resolve())):
        if a == b or b in a.parents:
            return True
    return False


__all__ = ["MARKER", "dtype_matched_checkpoint"]
