"""Block surgery for builders: train the top blocks on cached lower-block outputs (the last one
only at the positions a loss reads), or keep only the bottom blocks (an NLA AR's truncated
backbone). Documented helpers for plugins that build models (the mini NLA pair); the run never
calls them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def top_blocks_only(model: torch.nn.Module, start: int) -> Iterator[torch.nn.Module]:
    """Make the text decoder run only blocks ``start..`` for the duration (its ``inputs_embeds``
    are then block ``start``'s input); yields the decoder and always restores it. Used to train
    the top blocks on cached lower-block outputs."""
    decoder = model.get_decoder()
    layers, cfg = decoder.layers, decoder.config
    saved = (cfg.num_hidden_layers, list(cfg.layer_types))
    decoder.layers = torch.nn.ModuleList(list(layers)[start:])
    cfg.num_hidden_layers = len(decoder.layers)
    cfg.layer_types = saved[1][start:]
    try:
        yield decoder
    finally:
        decoder.layers = layers
        cfg.num_hidden_layers, cfg.layer_types = saved


def truncate_blocks(model: torch.nn.Module, keep: int) -> None:
    """Keep only blocks ``0..keep-1`` of a causal LM, for good (an NLA AR's truncated backbone)."""
    decoder = model.get_decoder()
    decoder.layers = torch.nn.ModuleList(list(decoder.layers)[:keep])
    cfg = model.config
    cfg.num_hidden_layers = keep
    cfg.layer_types = list(cfg.layer_types)[:keep]


#: the sub-modules of a sandwich-norm decoder block (Gemma 2/3) in the order its forward uses them
_SANDWICH = ("input_layernorm", "self_attn", "post_attention_layernorm", "pre_feedforward_layernorm", "mlp",
             "post_feedforward_layernorm")


@contextmanager
def last_block_at(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """For the duration, the decoder's last block runs its feed-forward half only at the positions
    ``(rows[i], cols[i])`` and the decoder returns those positions alone, ``[1, n, d]``, in that
    order. A builder that reads a few positions of its top block (the AR's last token, the AV's
    explanation tokens) skips the rest of that block's MLP, about 70% of the block; the result
    equals the full block's at those positions. The attention half still runs everywhere (every
    position is a key). Blocks of another layout run whole and are indexed after the fact."""
    layer = model.get_decoder().layers[-1]
    if not all(hasattr(layer, name) for name in _SANDWICH):
        original = layer.forward

        def indexed(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
            out = original(hidden_states, *args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            return out[rows, cols].unsqueeze(0)
    else:
        def indexed(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
            attn, _ = layer.self_attn(layer.input_layernorm(hidden_states), *args, **kwargs)
            h = (hidden_states + layer.post_attention_layernorm(attn))[rows, cols].unsqueeze(0)
            return h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))

    layer.forward = indexed
    try:
        yield
    finally:
        del layer.forward  # the class's forward again
