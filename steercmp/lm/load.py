"""Loading and unloading models and tokenizers (HF id, local directory, HF cache, embedded).

A model's blocks are found by :mod:`steercmp.lm.layout` (re-exported here for convenience).
"""

from __future__ import annotations

import copy
import functools
import gc
from pathlib import Path
from typing import Any

import attrs
import torch

from steercmp.catalog import EMBEDDED_ID, is_embedded
from steercmp.errors import ConfigError
from steercmp.lm.dtype_copy import dtype_matched_checkpoint
from steercmp.lm.embedded import ensure_embedded_model
from steercmp.lm.hooks import contiguous_readout
from steercmp.lm.layout import decoder_layers, text_config
from steercmp.lm.memory import trim_heap

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    """A torch dtype from a config spelling; ``auto`` is what ``device`` runs fastest
    (:mod:`steercmp.lm.device`)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        from steercmp.lm.device import fast_dtype

        name = fast_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}", fix=f"use one of {sorted(DTYPES)}") from None


def resolve_device(device: str) -> str:
    """``auto`` picks cuda, then mps, then cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@attrs.define
class LoadedModel:
    """A resident base model with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    source: str
    path: str
    dtype: torch.dtype
    device: str

    @property
    def layers(self) -> torch.nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(text_config(self.model.config).hidden_size)

    @property
    def input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def unload(self) -> None:
        """Drop every reference this object holds and release allocator memory."""
        release(self)


def resolve_source(model_id: str, progress: bool = True) -> str:
    """Map the embedded alias to its converted cache dir; pass HF ids and local dirs through."""
    if is_embedded(model_id):
        return str(ensure_embedded_model(progress=progress))
    return model_id


def load_base_model(
    model_id: str = EMBEDDED_ID,
    *,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> LoadedModel:
    """Load a causal LM (HF id, local directory or the embedded default) in eval mode.

    ``device_map`` (e.g. ``"auto"``) spreads a model larger than one device via accelerate;
    otherwise the whole model goes to ``device``. Weights load from safetensors only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype, device)
    device = resolve_device(device)
    path = resolve_source(model_id, progress=progress)
    if not is_embedded(model_id) and Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"model path {path!r} is a file", fix="point model.id at a directory")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              "use_safetensors": True}
    if revision:
        kwargs["revision"] = revision
    if device_map is not None:
        kwargs["device_map"] = device_map
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:  # --no-progress silences transformers' own "Loading weights" bar too
        hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code,
                                            revision=revision)
        model_cls: Any = AutoModelForCausalLM
        if type(config).__name__ == "Gemma3Config":  # the multimodal 4B/12B/27B wrapper
            from transformers import Gemma3ForConditionalGeneration

            model_cls = Gemma3ForConditionalGeneration
        # a float32 checkpoint steercmp built loads into 16 bits from its 16-bit copy (same weights)
        model = model_cls.from_pretrained(dtype_matched_checkpoint(path, torch_dtype), **kwargs)
        tokenizer = cached_tokenizer(str(path), revision, trust_remote_code)
    except OSError as exc:
        raise ConfigError(
            f"cannot load model {model_id!r}: {str(exc).splitlines()[0]}",
            where="model.id",
            fix="give a local directory with config.json and safetensors weights, a cached HF id "
                "(HF_HUB_OFFLINE=1 uses the cache), or 'embedded:gemma-3-270m'",
        ) from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    contiguous_readout(model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=model_id, path=str(path),
                       dtype=torch_dtype, device=device)


def release(obj: Any) -> None:
    """Release a model's memory: drop references, collect garbage, empty device caches."""
    if isinstance(obj, LoadedModel):
        model = obj.model
        obj.model = None
        obj.tokenizer = None
        del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()  # return freed heap pages to the OS so resident memory really drops on CPU


def check_model_source(model_id: str, where: str = "model.id") -> None:
    """A local model directory must exist, hold config.json and safetensors weights (pickled
    ``.bin`` weights are refused: loading them can run code). HF ids pass: they resolve through
    the cache when the model loads."""
    if is_embedded(model_id):
        return
    path = Path(model_id).expanduser()
    looks_local = model_id.startswith(("/", ".", "~")) or path.exists()
    if not looks_local:
        return
    if not path.exists():
        raise ConfigError(f"model directory {model_id!r} does not exist", where=where,
                          fix="give a local checkpoint directory, an HF id (owner/name) or embedded:gemma-3-270m")
    if not path.is_dir():
        raise ConfigError(f"model path {model_id!r} is a file, not a checkpoint directory", where=where,
                          fix="point model.id at the directory holding config.json")
    if not (path / "config.json").exists():
        raise ConfigError(f"model directory {model_id!r} has no config.json", where=where,
                          fix="point model.id at a Hugging Face checkpoint directory")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise ConfigError(
            f"model directory {model_id!r} has no safetensors weights"
            + (f" (found pickled {', '.join(pickled)}, which steercmp refuses to load)" if pickled else ""),
            where=where, fix="convert the weights to safetensors (model.save_pretrained(dir, safe_serialization=True))")


_TOKENIZERS: dict[tuple[Any, ...], Any] = {}
_DIGESTS: dict[tuple[Any, ...], str] = {}
#: a tokenizer folder's files that say how text becomes tokens, remote tokenizer code included (a
#: chat template does not: it is applied to the copy, so folders that differ only in it share one
#: parsed tokenizer)
TOKENIZER_FILES = (".json", ".model", ".txt", ".py")
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _tokenizer_digest(folder: Path) -> str:
    """The content hash of a folder's tokenizer files (weights' config and the chat template
    aside), memoised by file name, size and mtime."""
    import hashlib

    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in TOKENIZER_FILES
                   and f.name not in ("config.json", "generation_config.json") and not f.name.startswith("steercmp_"))
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if (folder, stamp) not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        _DIGESTS[(folder, stamp)] = h.hexdigest()
    return _DIGESTS[(folder, stamp)]


def cached_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """A tokenizer, parsed once per process and handed out as a shallow copy.

    A staged run loads the base model several times (extract, after the NLA and SAE stages, score,
    completions) and Gemma's 262k-entry tokenizer takes ~2.5 s and ~0.34 GiB to parse. Local
    folders are keyed by their tokenizer files' CONTENT, so the base model, the NLA AV and the AR
    (copies of one tokenizer) share one parsed object; a folder's ``chat_template.jinja`` is set
    on its copy. The copy keeps attribute changes (e.g. a ``chat_template``) private to its owner.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    local = folder.is_dir()
    key = (_tokenizer_digest(folder) if local else path, revision, trust_remote_code)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = drop_construction_tables(
            AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code))
        trim_heap()  # the parse's transient JSON tree (~0.19 GiB for Gemma's) goes back to the OS
    tok = copy.copy(_TOKENIZERS[key])
    if local:
        tok.chat_template = folder_chat_template(folder)
        tok.name_or_path = path
    return tok


#: the Python tables transformers 5's tokenizer classes build their Rust backend from and then keep
_CONSTRUCTION_TABLES = frozenset({"_vocab", "_merges"})


def drop_construction_tables(tok: Any) -> Any:
    """``tok`` without the Python copies of its vocabulary and merges, once its Rust backend is built.

    transformers 5's tokenizer classes (``GemmaTokenizer`` among them) read ``tokenizer.json`` into a
    Python dict and list, build the Rust tokenizer from them, and keep both as ``_vocab`` and
    ``_merges``: for Gemma's 262k entries and 515k merges that is 0.14 GiB resident for the whole run
    (docs/scaling.md), more than a quarter of the 270M model. They go only where no method of the
    class reads them after ``__init__`` (a few classes do, e.g. Whisper's ``save_vocabulary``), so
    encoding, decoding, ``get_vocab`` and ``save_pretrained`` are unchanged
    (tests/lm/test_tokenizer_cache.py). A slow (pure-Python) tokenizer keeps them."""
    if getattr(tok, "backend_tokenizer", None) is None or _reads_after_init(type(tok)):
        return tok
    for name in _CONSTRUCTION_TABLES:
        if isinstance(getattr(tok, name, None), dict | list):
            delattr(tok, name)
    return tok


@functools.cache
def _reads_after_init(cls: type) -> bool:
    """Whether any function of ``cls`` or its bases other than ``__init__`` names a construction table
    (the attribute names a function's code, nested code included, refers to)."""
    return any(_names(getattr(f, "__code__", None)) & _CONSTRUCTION_TABLES
               for klass in cls.__mro__ for attr, value in vars(klass).items() if attr != "__init__"
               for f in ((value.fget, value.fset) if isinstance(value, property) else (getattr(value, "__func__", value),)))


def _names(code: Any) -> set[str]:
    if code is None:
        return set()
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if hasattr(c, "co_names")))


def folder_chat_template(folder: Path) -> Any:
    """The chat template a tokenizer folder gives, where transformers looks for it:
    ``chat_template.jinja``, else ``chat_template.json``, else ``tokenizer_config.json``."""
    import json

    jinja = folder / CHAT_TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        config = folder / name
        if config.is_file():
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            if template is not None:
                return template
    return None


def load_tokenizer(model_id: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   where: str = "model.id") -> Any:
    """A model's tokenizer alone (no weights), for checks before any model loads."""
    path = resolve_source(model_id, progress=False)
    try:
        return cached_tokenizer(str(path), revision, trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {model_id!r}: {str(exc).splitlines()[0]}",
                          where=where,
                          fix="give a checkpoint directory with tokenizer files, a cached HF id "
                              "(HF_HUB_OFFLINE=1 uses the cache), or embedded:gemma-3-270m") from None


__all__ = ["DTYPES", "LoadedModel", "check_model_source", "decoder_layers", "load_base_model", "load_tokenizer",
           "parse_dtype", "release", "resolve_device", "resolve_source", "text_config"]
