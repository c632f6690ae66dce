"""A random sae-lens SAE in sae-lens' disk format, for tests (no hub, milliseconds)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_sae(path: str | Path, *, d_in: int = 64, d_sae: int = 96, layer: int = 2, seed: int = 11) -> Path:
    """A standard SAE reading ``model.layers.<layer>`` (width ``d_in``), random seeded weights,
    saved to ``path`` (``cfg.json`` + ``sae_weights.safetensors``): ``path: <path>`` loads it."""
    from sae_lens import SAE

    sae = SAE.from_dict({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                         "device": "cpu", "metadata": {"hook_name": f"model.layers.{layer}"}})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "b_" in name else 1.0))
    sae.save_model(Path(path))
    return Path(path)
