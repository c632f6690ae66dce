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


def random_jumprelu(d_in: int = 64, d_sae: int = 96, seed: int = 12) -> dict[str, torch.Tensor]:
    """Seeded random JumpReLU SAE parameters under Gemma Scope 2's names (w_enc, w_dec, b_enc,
    b_dec, threshold)."""
    gen = torch.Generator().manual_seed(seed)
    return {"w_enc": torch.randn(d_in, d_sae, generator=gen), "w_dec": torch.randn(d_sae, d_in, generator=gen),
            "b_enc": torch.randn(d_sae, generator=gen) * 0.1, "b_dec": torch.randn(d_in, generator=gen) * 0.1,
            "threshold": torch.rand(d_sae, generator=gen) * 0.1}


def write_gemma_scope_cache(hub_cache: str | Path, repo_id: str, folder: str, tensors: dict[str, torch.Tensor], *,
                            layer: int = 32, revision: str = "0" * 40) -> dict[str, torch.Tensor]:
    """JumpReLU SAE ``tensors`` (e.g. :func:`random_jumprelu`) in Gemma Scope 2's release layout
    (``<folder>/params.safetensors`` and ``<folder>/config.json``), placed in a Hugging Face cache
    at ``hub_cache`` under ``repo_id`` as a download would leave it. Returns the tensors."""
    import json

    from safetensors.torch import save_file

    repo = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision / folder
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    save_file(tensors, str(snap / "params.safetensors"))
    model = repo_id.split("/")[-1].replace("gemma-scope-2-", "gemma-v3-")
    (snap / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": model, "width": int(tensors["w_enc"].shape[1]),
        "hf_hook_point_in": f"model.language_model.layers.{layer}.output"}))
    return tensors
