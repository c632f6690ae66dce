"""Tests for the sae_features plugin: sae-lens consistency, selection rules, checks, deltas."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens import SAE

from steercmp.api import RunSettings
from steercmp.errors import ConfigError
from steercmp_plugins.sae.features import SaeFeatures, additive_delta, feature_swap_delta
from steercmp_plugins.sae.select import (
    Readout,
    contrast_scores,
    select_contrast,
    select_unembed,
    unembed_scores,
)
from steercmp_plugins.sae.sources import SaeSource, check_compatible, hook_layer, load_sae


def build_sae(d_in: int = 32, d_sae: int = 48, *, arch: str = "standard", seed: int = 0,
              hook: str = "blocks.2.hook_resid_post", **extra) -> SAE:
    """A random-weight sae-lens SAE built from a config dict (no download)."""
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "device": "cpu", "metadata": {"hook_name": hook}, **extra}
    sae = SAE.from_dict(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "b_" in name else 1.0))
    return sae.eval()


def manual_codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Standard SAE encoder written out: relu((x - b_dec) W_enc + b_enc)."""
    return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)


# ---------------------------------------------------------------- sae-lens consistency
def test_sae_lens_encode_decode_matches_manual_math():
    sae = build_sae()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        codes = sae.encode(x)
        assert torch.allclose(codes, manual_codes(sae, x), atol=1e-5)
        assert torch.allclose(sae.decode(codes), codes @ sae.W_dec + sae.b_dec, atol=1e-5)
        assert torch.allclose(sae(x), sae.decode(sae.encode(x)), atol=1e-6)


def test_topk_sae_round_trips_through_disk(tmp_path):
    sae = build_sae(arch="topk", k=4)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    sae.save_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        codes = sae.encode(x)
        assert int((codes != 0).sum(-1).max()) <= 4
        assert torch.allclose(loaded.encode(x), codes)
        assert torch.allclose(loaded.decode(codes), sae.decode(codes))


# ---------------------------------------------------------------- layer convention checks
@pytest.mark.parametrize("name,layer", [
    ("blocks.12.hook_resid_post", 12), ("blocks.13.hook_resid_pre", 12),
    ("model.layers.12", 12), ("model.model.layers.32", 32),
    ("model.model.language_model.layers.32", 32), ("model.language_model.layers.5", 5),
    ("layer_12_width_16k_l0_medium", 12), ("resid_post/layer_32_width_16k_l0_small", 32),
    ("blocks.12.hook_mlp_out", None), ("blocks.3.attn.hook_z", None), ("", None),
])
def test_hook_layer_spellings(name, layer):
    assert hook_layer(name) == layer


def test_layer_mismatch_names_the_field(tmp_path):
    build_sae(hook="blocks.3.hook_resid_post").save_model(tmp_path)
    with pytest.raises(ConfigError, match=r"layer.*reads layer 3.*experiment's layer is 2"):
        SaeSource.from_options({"path": str(tmp_path)}).check(2, 32)
    with pytest.raises(ConfigError, match="layer 3"):
        load_sae(SaeSource("path", path=str(tmp_path)), layer=2, d_model=32)


def test_d_in_mismatch_names_the_field(tmp_path):
    build_sae(hook="model.layers.2").save_model(tmp_path)
    src = SaeSource.from_options({"path": str(tmp_path)})
    src.check(2, 32)  # matching: fine
    with pytest.raises(ConfigError, match=r"d_in: SAE .* has d_in 32 but the model's hidden size is 64"):
        src.check(2, 64)
    with pytest.raises(ConfigError, match="d_in 32"):
        load_sae(src, layer=2, d_model=64)


def test_non_residual_hook_is_rejected():
    with pytest.raises(ConfigError, match="not a residual-stream"):
        check_compatible(hook_name="blocks.2.hook_mlp_out", d_in=32, layer=2, d_model=32, what="x")
    with pytest.raises(ConfigError, match="not a residual-stream"):
        SaeSource("release", release="gemma-scope-2-270m-pt-mlp",
                  sae_id="layer_12_width_16k_l0_medium").check(12, 640)


def test_gemma_scope_release_checks_without_download():
    src = SaeSource.from_options({"release": "gemma-scope-2-270m-pt-res",
                                  "sae_id": "layer_12_width_16k_l0_medium"})
    src.check(12, 640)
    with pytest.raises(ConfigError, match="reads layer 12"):
        src.check(9, 640)
    with pytest.raises(ConfigError, match="d_in 640"):
        src.check(12, 3840)
    with pytest.raises(ConfigError, match="sae_id"):
        SaeSource("release", release="gemma-scope-2-270m-pt-res", sae_id="layer_12_nope").check(12, 640)


def test_unreachable_hub_points_to_local_directory(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(SAE, "from_pretrained", classmethod(lambda cls, *a, **k: offline()))
    src = SaeSource("release", release="gemma-scope-2-270m-pt-res",
                    sae_id="layer_12_width_16k_l0_medium")
    with pytest.raises(ConfigError, match=r"hub.*fix: .*set path: DIR") as info:
        load_sae(src, layer=12, d_model=640)
    assert "\n" not in str(info.value)


def test_twelve_b_resource_estimate_without_download():
    exp = RunSettings(layer=32, model_id="google/gemma-3-12b-it", chat_template=True)
    m = SaeFeatures({"release": "gemma-scope-2-12b-it-res-all",
                     "sae_id": "layer_32_width_16k_l0_small"}, exp)
    m.validate()
    (res,) = m.resources()
    assert res.kind == "sae" and res.params == 3840 * 16384 * 2
    assert res.estimated_bytes == 3840 * 16384 * 2 * 4


@pytest.mark.parametrize("options,match", [
    ({"mode": "swap"}, "mode"), ({"selection": "best"}, "selection"), ({"k": 0}, "k"),
    ({"strength": -1}, "strength"), ({"path": "x", "release": "y", "sae_id": "z"}, "not both"),
    ({"bogus": 1}, "unknown option"),
])
def test_bad_options(options, match):
    exp = RunSettings(layer=12, model_id="embedded:gemma-3-270m")
    with pytest.raises(ConfigError, match=match):
        SaeFeatures(options, exp).validate()


# ---------------------------------------------------------------- selection rules
def test_unembed_rule_recovers_planted_feature():
    gen = torch.Generator().manual_seed(3)
    d, vocab = 16, 40
    W_U = torch.randn(vocab, d, generator=gen)
    gamma = 1.0 + 0.5 * torch.rand(d, generator=gen)
    family = [5, 9, 11]
    sae = build_sae(d_in=d, d_sae=64, seed=4)
    planted = gamma * (W_U[family].mean(0) - W_U.mean(0))
    with torch.no_grad():
        sae.W_dec[37] = 3.0 * planted / planted.norm()  # scale must not matter
    readout = Readout.build(W_U, family + [1, 2], gamma)
    sel = select_unembed(sae.W_dec, readout, family, k=3)
    assert sel.features[0] == 37 and sel.rule == "unembed"
    scores = unembed_scores(sae.W_dec, readout, family)
    # independent: logit-lens mean family logit minus vocabulary mean, unit decoder row
    unit = sae.W_dec[37] / sae.W_dec[37].norm()
    logits = W_U @ (gamma * unit)
    assert torch.isclose(scores[37], logits[family].mean() - logits.mean(), atol=1e-4)


def _contrast_battery(planted: int, extra_only_first: int | None = None):
    """Planning activations of 8 prompts: rhyme A prompts carry feature ``planted``."""
    gen = torch.Generator().manual_seed(5)
    d, d_sae = 16, 32
    sae = build_sae(d_in=d, d_sae=d_sae, seed=6)
    with torch.no_grad():  # tied, unit-norm dictionary, no biases: codes read directions cleanly
        W = torch.nn.functional.normalize(torch.randn(d_sae, d, generator=gen), dim=-1)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    rhymes = ["A"] * 4 + ["B"] * 4
    acts = 0.1 * torch.randn(8, d, generator=gen)
    acts[:4] += 3.0 * W[planted]
    if extra_only_first is not None:
        acts[0] += 6.0 * W[extra_only_first]
    with torch.no_grad():
        codes = sae.encode(acts)
    return codes, rhymes


def test_contrast_rule_recovers_planted_feature():
    codes, rhymes = _contrast_battery(planted=7)
    sel = select_contrast(codes, rhymes, "A", k=2, hold_out=[1])
    assert sel.features[0] == 7 and "3 matching / 4 other" in sel.note


def test_contrast_rule_holds_out_the_scored_prompt():
    codes, rhymes = _contrast_battery(planted=7, extra_only_first=20)
    # feature 20 fires only on prompt 0: visible when prompt 0 is used, absent when held out
    assert 20 in select_contrast(codes, rhymes, "A", k=3).features
    assert 20 not in select_contrast(codes, rhymes, "A", k=3, hold_out=[0]).features
    scores, n_pos, n_neg = contrast_scores(codes, rhymes, "C", hold_out=[0])
    assert (n_pos, n_neg) == (0, 7) and not scores.any()


# ---------------------------------------------------------------- deltas
def test_feature_swap_delta_matches_manual_math():
    sae = build_sae(seed=8)
    h = torch.randn(32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        c = manual_codes(sae, h)
    down = [int(i) for i in torch.nonzero(c).flatten()[:3]]
    up = [int(i) for i in torch.nonzero(c == 0).flatten()[:2]] + [down[0]]  # down[0] goes up
    up_values = torch.full((48,), 2.5)
    delta = feature_swap_delta(sae, h, down, up, up_values)
    c2 = c.clone()
    c2[down[1:]] = 0.0
    c2[up] = torch.maximum(c[up], up_values[up])
    expected = (c2 - c) @ sae.W_dec.detach()
    assert delta.dtype == torch.float32 and delta.shape == (32,)
    assert torch.allclose(delta, expected, atol=1e-4)


def test_additive_delta_is_weighted_decoder_sum():
    sae = build_sae(seed=10)
    up_values = torch.arange(48, dtype=torch.float32)
    delta = additive_delta(sae.W_dec, [3, 7], [2.0, 1.0], up_values)
    expected = 3.0 * sae.W_dec[3] + 7.0 * 0.5 * sae.W_dec[7]
    assert torch.allclose(delta, expected.detach(), atol=1e-5)


# ---------------------------------------------------------------- the method end to end
@pytest.fixture
def tiny_sae_dir(tmp_path):
    build_sae(d_in=64, d_sae=96, seed=11, hook="model.layers.2").save_model(tmp_path)
    return tmp_path


@pytest.mark.parametrize("mode", ["feature_swap", "additive"])
def test_conformance(tiny_sae_dir, mode):
    import steercmp.testing

    report = steercmp.testing.check_method(SaeFeatures, options={"path": str(tiny_sae_dir),
                                                                 "mode": mode, "k": 3})
    rows = report.runtime.tables["features"]
    assert {r["family"] for r in rows} == {"original", "edited", "unrelated"}
    assert all(r["rule"] == "unembed" and r["mode"] == mode for r in rows)


def test_method_swap_delta_matches_independent_computation(tiny_sae_dir):
    import steercmp.testing as kit

    lm = kit.tiny_lm()
    contexts = kit.tiny_contexts(lm)
    runtime = kit.TestRuntime(lm, layer=2)
    method = SaeFeatures({"path": str(tiny_sae_dir), "k": 3, "strength": 2.0},
                         kit.tiny_experiment("sae_features", layer=2).run_settings("sae_features"))
    method.validate()
    proposals = method.propose(contexts, runtime)
    sae = SAE.load_from_disk(tiny_sae_dir)
    with torch.no_grad():
        max_act = torch.stack([manual_codes(sae, c.resid[1:]).max(0).values for c in contexts]
                              ).max(0).values
    fallback = float(max_act[max_act > 0].median())
    up_values = 2.0 * torch.where(max_act > 0, max_act, torch.full_like(max_act, fallback))
    by_key = {(p.prompt_id, p.family): p for p in proposals}
    for ctx in contexts:
        for fam in ("edited", "unrelated"):
            p = by_key[(ctx.prompt.id, fam)]
            assert p.meta["mode"] == "feature_swap" and len(p.meta["features"]) == 3
            with torch.no_grad():
                c = manual_codes(sae, ctx.activation)
                c2 = c.clone()
                down = [f for f in p.meta["original_features"] if f not in p.meta["features"]]
                c2[down] = 0.0
                up = p.meta["features"]
                c2[up] = torch.maximum(c[up], up_values[up])
                expected = (c2 - c) @ sae.W_dec
            assert torch.allclose(p.delta, expected, atol=1e-4), (ctx.prompt.id, fam)
    json.dumps([dict(p.meta) for p in proposals])


def test_method_contrast_rule_with_battery_only(tiny_sae_dir):
    import steercmp.testing as kit

    lm = kit.tiny_lm()
    contexts = kit.tiny_contexts(lm)
    runtime = kit.TestRuntime(lm, layer=2)
    method = SaeFeatures({"path": str(tiny_sae_dir), "selection": "contrast",
                          "contrast_couplets": 0}, kit.tiny_experiment("sae_features", layer=2).run_settings("sae_features"))
    method.validate()
    proposals = method.propose(contexts, runtime)
    assert len(proposals) == 2 * len(contexts)
    for p in proposals:  # every selection notes how many prompts it contrasted, scored one held out
        assert p.meta["rule"] == "contrast" and "held out" in p.meta["note"]
        assert p.status in ("ok", "dropped")


# ---------------------------------------------------------------- the embedded SAE (slow)
@pytest.mark.slow
def test_embedded_sae_quality_and_layer(embedded_lm):
    from steercmp_plugins.sae.train import MARKER, embedded_sae_dir, read_quality

    if not (embedded_sae_dir() / MARKER).exists():
        pytest.skip("embedded SAE not trained yet (steercmp_plugins.sae.train.ensure_embedded_sae)")
    sae = load_sae(SaeSource.from_options({"path": "embedded"}), layer=12,
                   d_model=embedded_lm.d_model)
    q = read_quality()
    assert q["explained_variance"] >= 0.7 and q["l0"] <= 64
    ids = embedded_lm.tokenizer("The river ran beside the stream,\nAnd", return_tensors="pt")
    with torch.no_grad():
        hs = embedded_lm.model(**ids, output_hidden_states=True).hidden_states[13][0, 1:]
        recon = sae(hs)
    ev = 1 - ((hs - recon) ** 2).sum() / ((hs - hs.mean(0)) ** 2).sum()
    assert float(ev) > 0.5


# ---------------------------------------------------------------- training code path (tiny)
def test_train_topk_sae_on_synthetic_sparse_data(tmp_path):
    from steercmp_plugins.sae.train import TrainSettings, measure_quality, train_topk_sae

    gen = torch.Generator().manual_seed(12)
    dictionary = torch.nn.functional.normalize(torch.randn(24, 16, generator=gen), dim=-1)
    which = torch.randint(0, 24, (1800, 2), generator=gen)
    acts = 50.0 * (dictionary[which[:, 0]] + 0.5 * dictionary[which[:, 1]])  # large raw norms
    settings = TrainSettings(d_sae=32, k=2, epochs=4, batch_size=100, lr=1e-2,
                             dead_feature_window=50)
    sae = train_topk_sae(acts[:1500], settings, hook_name="model.layers.2", model_name="synthetic")
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.metadata.hook_name == "model.layers.2" and loaded.cfg.d_in == 16
    held = acts[1500:]
    with torch.no_grad():  # the saved inference SAE computes what the trained one does
        assert torch.allclose(loaded(held), sae(held), atol=1e-3)
    q = measure_quality(loaded, held)
    # raw inputs of norm ~50: a positive EV means sae-lens folded its input scaling back correctly
    # (60 steps only; the real SAE's quality is measured by ensure_embedded_sae)
    assert q["l0"] <= 2.0 + 1e-6 and q["explained_variance"] > 0.1
