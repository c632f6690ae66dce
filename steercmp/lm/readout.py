"""The model's own readout: the final norm's gain and the unembedding directions of words.

One helper for the final RMSNorm gain serves the text-only Gemma 3 (``model.model.norm``) and the
multimodal 12B/27B wrapper (``model.model.language_model.norm``): Gemma multiplies by
``1 + weight``, other families by ``weight``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from steercmp.lm.prompts import encode_form


def final_norm(model: Any) -> torch.nn.Module | None:
    """The final norm of a causal LM's text decoder (also inside Gemma 3's multimodal wrapper)."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        dec = get_decoder()
        for owner in (dec, getattr(dec, "language_model", None)):
            norm = getattr(owner, "norm", None)
            if norm is not None:
                return norm
    inner = getattr(model, "model", None)
    return getattr(inner, "norm", None) if inner is not None else None


def final_norm_gain(model: Any) -> torch.Tensor | None:
    """The final norm's effective per-dimension gain, float32 on CPU (``None`` without a norm)."""
    norm = final_norm(model)
    w = getattr(norm, "weight", None)
    if w is None:
        return None
    w = w.detach().float().cpu()
    return 1.0 + w if "Gemma" in type(norm).__name__ else w


def readout_directions(lm: Any, words: Sequence[str]) -> torch.Tensor:
    """Residual-space directions that raise each word's leading-space first token's logit:
    the output-embedding row times the final norm's gain, ``[len(words), d_model]``."""
    w_u = lm.model.get_output_embeddings().weight
    ids = torch.as_tensor([encode_form(lm.tokenizer, " " + word)[0] for word in words], device=w_u.device)
    rows = w_u.detach().index_select(0, ids).float().cpu()  # only the rows needed: no vocabulary-sized copy
    gain = final_norm_gain(lm.model)
    return rows * gain if gain is not None else rows


def project_to_vocab(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states (after the final norm), as the model's own forward computes
    them: its output layer, then the final-logit soft cap where the model's own config sets one
    (Gemma 2; transformers' multimodal Gemma 3 wrapper applies none, and its top-level config has
    none). With :func:`steercmp.lm.hooks.readout_skipped`, a caller projects many passes' rows in
    one call."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


__all__ = ["final_norm", "final_norm_gain", "project_to_vocab", "readout_directions"]
