"""Held-out quality of the mini pair: how often the AV names the rhyme or plan word, and the
AR's fve_nrm from the AV's own explanations (and from the grounded oracle explanations), both
through the released-layout loaders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from steercmp.api import progress_bar

from ..ar import ActivationReconstructor
from ..av import ActivationVerbalizer
from ..editing import mentions
from ..fidelity import baseline_variance, fidelity
from .data import SEED


def evaluate(av_dir: Path, ar_dir: Path, items: Sequence[dict[str, Any]], gold: torch.Tensor,
             *, progress: bool = True, seed: int = SEED, n: int = 2) -> dict[str, Any]:
    """Held-out quality: AV naming rate and AR fve_nrm from the AV's own explanations."""

    av = ActivationVerbalizer.load(av_dir)
    rows = []
    bar = progress_bar(enabled=progress, total=len(items) * n, desc="nla mini: held-out explanations")
    flat = [(i, s) for i in range(len(items)) for s in range(n)]
    for start in range(0, len(flat), 16):
        chunk = flat[start:start + 16]
        gens = [torch.Generator().manual_seed(seed * 1000 + i * 10 + s) for i, s in chunk]
        outs = av.explain(gold[[i for i, _ in chunk]], generators=gens, temperature=1.0,
                          max_new_tokens=48)
        for (i, s), (expl, _raw, _complete) in zip(chunk, outs, strict=True):
            it = items[i]
            named = bool(mentions(expl, [it["line_end"], *it["plans"]]))
            rows.append({"item": i, "sample": s, "explanation": expl, "named": named})
        bar.update(len(chunk))
    bar.close()
    av.unload()
    ar = ActivationReconstructor.load(ar_dir)
    base = baseline_variance(gold)
    preds = ar.reconstruct([r["explanation"] for r in rows])
    fves = [fidelity(p, gold[r["item"]], base).fve_nrm for p, r in zip(preds, rows, strict=True)]
    tmpl = ar.reconstruct([it["explanation"] for it in items])  # the grounded (oracle) explanations
    fves_t = [fidelity(p, gold[i], base).fve_nrm for i, p in enumerate(tmpl)]
    ar.unload()
    for r, f in zip(rows, fves, strict=True):
        r["fve_nrm"] = f
    return {
        "n_eval_prompts": len(items), "samples_per_prompt": n,
        "name_rate": sum(r["named"] for r in rows) / len(rows),
        "fve_nrm_av": sum(fves) / len(fves),
        "fve_nrm_oracle": sum(fves_t) / len(fves_t),
        "baseline_variance": base,
        "examples": rows[: 2 * n] + rows[-2:],
    }
