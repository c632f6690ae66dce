"""The miniature pair on the embedded Gemma 3 270M (skipped unless it is already built)."""

from __future__ import annotations

import json

import pytest
import torch

from steercmp_plugins.nla import mini

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not mini.is_built(position="last"), reason="mini NLA pair not cached (steercmp nla build-mini)")
def test_mini_pair_loads_with_released_loader_and_explains():
    from steercmp_plugins.nla.ar import ActivationReconstructor
    from steercmp_plugins.nla.av import ActivationVerbalizer

    av_dir, ar_dir = mini.ensure_mini_pair(progress=False, position="last")
    quality = json.loads((mini.mini_dir("last") / "quality.json").read_text())
    assert {"fve_nrm_av", "name_rate", "build_seconds", "fve_nrm_oracle", "ar_training"} <= set(quality)
    assert set(quality["targets"]) == {"fve_nrm_av", "name_rate", "build_seconds"}
    av = ActivationVerbalizer.load(av_dir)
    assert av.meta.extraction_layer == 12 and av.meta.d_model == 640
    out = av.explain(torch.randn(1, 640), generators=None, greedy=True, max_new_tokens=8)
    assert isinstance(out[0][0], str)
    av.unload()
    ar = ActivationReconstructor.load(ar_dir)
    assert len(ar.lm.model.get_decoder().layers) == 13
    assert ar.reconstruct(["The line ends with stream."]).shape == (1, 640)
    ar.unload()
