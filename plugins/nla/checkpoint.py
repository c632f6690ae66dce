"""Finding an NLA checkpoint directory (local dir or HF id) and loading its language model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from steercmp.api import ConfigError, LoadedModel, load_base_model, text_config

from .meta import SIDECAR_NAME, NlaMeta


def resolve_checkpoint(source: str, role: str, *, progress: bool = True) -> Path:
    """A local directory holding the checkpoint named by ``source``: a local directory as is;
    anything else is a Hugging Face id resolved through the HF cache (``HF_HUB_OFFLINE=1``
    keeps it offline)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{source!r} is a file, not a checkpoint directory", where=role,
                          fix="point at the directory holding config.json and nla_meta.yaml")
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ConfigError(f"checkpoint {source!r} is neither a directory nor a Hugging Face id",
                          where=role, fix="give a local directory, an owner/name id, or 'mini'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source))
    except Exception as exc:  # offline, unknown id, gated repo...
        raise ConfigError(
            f"cannot fetch NLA checkpoint {source!r}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}", where=role,
            fix="download it on a machine with hub access and pass the local directory "
                "(or set HF_HUB_OFFLINE=1 with a populated cache)") from exc


def read_meta(directory: Path, role: str) -> NlaMeta:
    if not (directory / SIDECAR_NAME).exists():
        raise ConfigError(f"no {SIDECAR_NAME} in {str(directory)!r}", where=role,
                          fix="NLA checkpoints ship a sidecar; point at the released layout")
    meta = NlaMeta.from_yaml(directory / SIDECAR_NAME)
    if meta.role != role:
        raise ConfigError(f"sidecar role is {meta.role!r} but this slot needs {role!r}",
                          where=meta.field_where("role"),
                          fix=f"pass the {role.upper()} checkpoint here")
    return meta


def load_lm(directory: Path, *, dtype: str | torch.dtype, device: str) -> LoadedModel:
    """Load the checkpoint's causal LM and tokenizer with steercmp's one model loader."""
    return load_base_model(str(directory), dtype=dtype, device=device, progress=False)


def hidden_size(model: Any) -> int:
    return int(text_config(model.config).hidden_size)


def as_id_list(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list, a BatchEncoding or a nested list
    depending on the transformers version; normalise to ``list[int]``."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    encoded = list(encoded)
    if encoded and isinstance(encoded[0], list | tuple):
        if len(encoded) != 1:
            raise ValueError("expected one sequence")
        encoded = list(encoded[0])
    return [int(x) for x in encoded]


#: elements checked at once: an element-wise mask of a whole 262k-row embedding is 168 MB
FINITE_CHECK_CHUNK = 1 << 22


def check_finite_weights(module: torch.nn.Module, what: str, where: str) -> None:
    """Refuse a checkpoint with NaN or Inf weights (corrupted RL'd value heads have been seen).
    Each tensor is checked once (tied weights share one) and a slice at a time."""
    seen: set[tuple[int, int]] = set()
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.numel())
        if not tensor.is_floating_point() or key in seen:
            continue
        seen.add(key)
        if not all(bool(torch.isfinite(part).all()) for part in tensor.detach().reshape(-1).split(FINITE_CHECK_CHUNK)):
            raise ConfigError(f"{what} weight {name!r} contains NaN or Inf", where=where,
                              fix="the checkpoint is corrupted: re-download or re-export it")
