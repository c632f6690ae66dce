"""A Gemma Scope 2 release SAE loads from a populated Hugging Face cache with the hub offline
(sae-lens' own range request for the tensor shapes is never made), ``steercmp plan`` names the
cache, and a missing SAE is refused offline with one whole line."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub import constants
from sae_lens.loading import pretrained_sae_loaders as loaders

from steercmp.errors import ConfigError
from steercmp_plugins.sae.sources import SaeSource, load_sae, origin
from steercmp_plugins.sae.tiny_sae import random_jumprelu, write_gemma_scope_cache

RELEASE, SAE_ID = "gemma-scope-2-12b-it-res-all", "layer_32_width_16k_l0_small"
REPO, FOLDER = "google/gemma-scope-2-12b-it", "resid_post_all/layer_32_width_16k_l0_small"


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(repo_id, filename):
        raise AssertionError(f"network request for {repo_id}/{filename}")

    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", no_network)
    return tmp_path / "hub"


def test_release_loads_from_the_cache_offline(offline_cache):
    tensors = write_gemma_scope_cache(offline_cache, REPO, FOLDER, random_jumprelu(d_in=64, d_sae=96), layer=32)
    source = SaeSource("release", release=RELEASE, sae_id=SAE_ID)
    assert origin(source).startswith("Hugging Face cache")
    sae = load_sae(source, layer=32, d_model=None)
    assert torch.equal(sae.W_enc.detach(), tensors["w_enc"]) and torch.equal(sae.W_dec.detach(), tensors["w_dec"])
    x = torch.randn(3, 64)
    pre = x @ tensors["w_enc"] + tensors["b_enc"]  # JumpReLU: keep pre-activations above the threshold
    want = pre * (pre > tensors["threshold"])
    assert torch.allclose(sae.encode(x), want, atol=1e-5)
    assert loaders.get_safetensors_tensor_shapes.__name__ == "no_network"  # restored after the load


def test_missing_release_is_refused_offline_in_one_whole_line(offline_cache):
    source = SaeSource("release", release=RELEASE, sae_id=SAE_ID)
    with pytest.raises(ConfigError) as info:
        origin(source)
    line = info.value.one_line()
    assert "is not in the Hugging Face cache" in line and "HF_HUB_OFFLINE is set" in line and "\n" not in line
    with pytest.raises(ConfigError) as info:
        load_sae(source, layer=32, d_model=None)
    line = info.value.one_line()
    assert "params.safetensors is missing" in line and line.rstrip().endswith("or point at a local directory")
