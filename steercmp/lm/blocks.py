"""Block surgery for builders: train the top blocks on cached lower-block outputs, or keep
only the bottom blocks (an NLA AR's truncated backbone). Documented helpers for plugins that
build models (the mini NLA pair); the run never calls them.
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
