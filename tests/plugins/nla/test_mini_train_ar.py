"""The mini AR's trainer on the tiny model: its first training-set point is the ridge head on the
untrained blocks' features (computed once, not twice), and training improves the fit."""

from __future__ import annotations

import torch

from steercmp.lm.capture import capture_residuals
from steercmp.lm.prompts import tokenize_text
from steercmp.testing import COUPLET_BATTERY
from steercmp_plugins.nla.fidelity import baseline_variance, normalise
from steercmp_plugins.nla.mini.build import _ridge
from steercmp_plugins.nla.mini.train_ar import ArSchedule, nmse, train_ar


def test_train_ar_starts_from_the_frozen_fit_and_improves_it(tiny_lm):
    full = [p["text"] for p in COUPLET_BATTERY["prompts"]]
    texts = full + [t.rsplit(" ", 1)[0] for t in full]  # several lengths in one batch
    gold = torch.randn(len(texts), 64, generator=torch.Generator().manual_seed(0))

    def prompt_ids(text: str) -> list[int]:
        return list(tokenize_text(tiny_lm.tokenizer, text)[0])

    def fit_head(feats: torch.Tensor) -> torch.Tensor:  # heavily regularised: room to improve
        return _ridge(feats, normalise(gold), 10.0)

    n_layers = len(tiny_lm.model.get_decoder().layers)
    # the reference: the untrained backbone's last-token output through the capture path (the
    # decoder's final norm is not part of it), before train_ar changes the blocks in place
    feats = torch.stack([r[-1] for r in capture_residuals(tiny_lm, n_layers - 1, [prompt_ids(t) for t in texts])])
    want = 1.0 - float(nmse(feats @ fit_head(feats), gold)) / baseline_variance(gold)

    head, curves = train_ar(tiny_lm, prompt_ids, (texts, gold), (texts[:4], gold[:4]), fit_head,
                            ArSchedule(blocks=2, epochs=3, batch=4, lr=1e-3, seed=0), progress=False)
    assert head.shape == (64, 64)
    assert curves["epoch"] == [0, 1, 2, 3] and len(curves["heldout_fve_nrm"]) == 4
    first, last = curves["train_fve_nrm"]
    assert abs(first - want) < 1e-4
    assert last > first


def test_frozen_blocks_come_from_the_frozen_model_when_given(tiny_lm):
    """The build hands train_ar the base model in the training dtype for the frozen blocks' one
    pass: that model's blocks set the frozen features (a perturbed copy changes the fit, an equal
    copy changes nothing), and it is unloaded afterwards."""
    import copy

    texts = [p["text"] for p in COUPLET_BATTERY["prompts"]]
    gold = torch.randn(len(texts), 64, generator=torch.Generator().manual_seed(1))

    def prompt_ids(text: str) -> list[int]:
        return list(tokenize_text(tiny_lm.tokenizer, text)[0])

    def run(frozen=None):  # noqa: ANN001, ANN202
        return train_ar(copy.deepcopy(tiny_lm), prompt_ids, (texts, gold), (texts[:4], gold[:4]),
                        lambda f: _ridge(f, normalise(gold), 10.0),
                        ArSchedule(blocks=2, epochs=1, batch=4, lr=1e-3, seed=0), progress=False, frozen_model=frozen)

    _, alone = run()
    same = copy.deepcopy(tiny_lm)
    _, with_same = run(same)
    assert with_same["heldout_fve_nrm"] == alone["heldout_fve_nrm"]
    assert same.model is None  # unloaded once its pass is done
    perturbed = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        for p in perturbed.model.get_decoder().layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, with_perturbed = run(perturbed)
    assert with_perturbed["heldout_fve_nrm"][0] != alone["heldout_fve_nrm"][0]
