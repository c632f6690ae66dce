"""The ``sae_features`` method: steer with SAE features chosen for a rhyme family.

Options (under ``methods[].options``):

- SAE source: ``release`` + ``sae_id`` (sae-lens; needs the hub), ``path: DIR`` (sae-lens disk
  format) or ``path: embedded`` (steercmp's own layer-12 SAE for the embedded 270M; the default);
- ``selection``: ``unembed`` (rule a, default) or ``contrast`` (rule b), see :mod:`.select`;
- ``mode``: ``feature_swap`` (default) or ``additive``;
- ``k``: features per family (default 4); ``strength``: multiplier on the "up" value (default 1);
- ``contrast_couplets``: extra generated couplets for rule (b), battery words excluded (default 160).

``feature_swap`` is the SAE analogue of the NLA text edit: encode the activation ``h`` at the
planning position, ``c = encode(h)``; ``c'`` = ``c`` with the ORIGINAL family's features set to 0
and the target family's features set to ``max(c_f, up_f)``; ``delta = decode(c') - decode(c)``.
``up_f`` is the feature's largest activation on the battery (any token but BOS) times ``strength``:
a scale, not a selection, so it may read every battery prompt. ``additive`` adds
``sum_i up_i * (score_i / max score) * W_dec[f_i]`` for the target family's features.
The ``unrelated`` family goes through the same code path (``unrelated_edit``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import torch

from steercmp.api import (
    PROPOSAL_FAMILIES,
    ConfigError,
    Method,
    MethodRuntime,
    PromptContext,
    Proposal,
    Resource,
    RunSettings,
    final_norm_gain,
    known_model,
    make_couplets,
    rhyme_part,
)
from steercmp_plugins.sae.select import (
    Readout,
    Selection,
    family_token_ids,
    select_contrast,
    select_unembed,
)
from steercmp_plugins.sae.sources import SaeSource, check_compatible, load_sae
from steercmp_plugins.sae.sources import origin as sae_origin

__all__ = ["SaeFeatures", "feature_swap_delta", "additive_delta"]

MODES = ("feature_swap", "additive")
RULES = ("unembed", "contrast")
OPTIONS = {"release", "sae_id", "path", "mode", "selection", "k", "strength", "contrast_couplets"}
_OPT = "methods.sae_features"


@torch.no_grad()
def feature_swap_delta(sae: Any, h: torch.Tensor, down: Sequence[int], up: Sequence[int],
                       up_values: torch.Tensor) -> torch.Tensor:
    """``decode(c') - decode(c)`` for ``c = encode(h)``: ``down`` features to 0, ``up`` features to
    ``max(c_f, up_values[f])`` (a feature in both lists goes up). Returns float32 ``[d_in]``."""
    x = h.detach().float().reshape(1, -1).to(sae.W_dec.device, sae.W_dec.dtype)
    codes = sae.encode(x)
    edited = codes.clone()
    down_only = [f for f in down if f not in set(up)]
    if down_only:
        edited[0, down_only] = 0.0
    if up:
        idx = list(up)
        target = up_values[idx].to(edited.dtype).to(edited.device)
        edited[0, idx] = torch.maximum(edited[0, idx], target)
    return (sae.decode(edited) - sae.decode(codes))[0].float().cpu()


@torch.no_grad()
def additive_delta(W_dec: torch.Tensor, features: Sequence[int], scores: Sequence[float],
                   up_values: torch.Tensor) -> torch.Tensor:
    """``sum_i up_i * (score_i / max score) * W_dec[f_i]``: float32 ``[d_in]``."""
    W = W_dec.detach().float().cpu()
    top = max(scores)
    delta = torch.zeros(W.shape[1])
    for f, s in zip(features, scores, strict=True):
        delta += float(up_values[f]) * (float(s) / top) * W[f]
    return delta


def _rhyme_of(words: Sequence[str]) -> str:
    """The most common CMU rhyme sound of ``words`` ('' when none is in the dictionary)."""
    parts = [p for p in (rhyme_part(w) for w in words) if p]
    return Counter(parts).most_common(1)[0][0] if parts else ""


class SaeFeatures(Method):
    """SAE-feature steering (sae-lens): additive or feature-swap edits toward a rhyme family."""

    name: ClassVar[str] = "sae_features"
    description: ClassVar[str] = ("SAE features for the target rhyme family (sae-lens; Gemma Scope 2 "
                                  "or steercmp's embedded SAE), feature swap or additive")

    def __init__(self, options: Mapping[str, Any], settings: RunSettings | None = None):
        super().__init__(options, settings)
        o = self.options
        self.mode = str(o.get("mode", "feature_swap"))
        self.selection = str(o.get("selection", "unembed"))
        self.k = o.get("k", 4)
        self.strength = o.get("strength", 1.0)
        self.contrast_couplets = o.get("contrast_couplets", 160)

    # ------------------------------------------------------------------ config
    @property
    def layer(self) -> int:
        return self.settings.layer if self.settings.layer is not None else 12

    def _model_id(self) -> str:
        return self.settings.model_id

    def _d_model_hint(self) -> int | None:
        """The model's hidden size if known without loading it (embedded or a known HF id)."""
        info = known_model(self._model_id())
        return info.d_model if info is not None else None

    def source(self) -> SaeSource:
        return SaeSource.from_options(self.options)

    def validate(self) -> None:
        unknown = set(self.options) - OPTIONS
        if unknown:
            raise ConfigError(f"unknown option(s) {sorted(unknown)}", where=_OPT,
                              fix=f"use {sorted(OPTIONS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}", where=f"{_OPT}: mode",
                              fix=f"use one of {list(MODES)}")
        if self.selection not in RULES:
            raise ConfigError(f"unknown selection rule {self.selection!r}",
                              where=f"{_OPT}: selection", fix=f"use one of {list(RULES)}")
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k > 0):
            raise ConfigError(f"k must be a positive integer, got {self.k!r}", where=f"{_OPT}: k",
                              fix="e.g. k: 4")
        if not (isinstance(self.strength, int | float) and self.strength > 0):
            raise ConfigError(f"strength must be a positive number, got {self.strength!r}",
                              where=f"{_OPT}: strength", fix="e.g. strength: 1.0")
        if not (isinstance(self.contrast_couplets, int) and self.contrast_couplets >= 0):
            raise ConfigError("contrast_couplets must be a non-negative integer",
                              where=f"{_OPT}: contrast_couplets", fix="e.g. contrast_couplets: 160")
        self.source().check(self.layer, self._d_model_hint())

    def _resource(self, d_model: int | None) -> Resource:
        src = self.source()
        try:
            exp = src.expected(d_model)
        except ConfigError:
            exp = {}
        d_in, d_sae = exp.get("d_in") or d_model, exp.get("d_sae")
        params = int(d_in) * int(d_sae) * 2 if d_in and d_sae else None
        return Resource(
            name=f"sae:{src.describe()}", kind="sae", source=src.describe(),
            loader=partial(load_sae, src, layer=self.layer, d_model=d_model),
            params=params, bytes_per_param=4.0,
            note=f"sae-lens SAE, d_in {d_in}, d_sae {d_sae}, float32 on CPU (W_enc + W_dec)",
            origin=partial(sae_origin, src))

    def resources(self) -> Sequence[Resource]:
        return (self._resource(self._d_model_hint()),)

    def pending_build(self) -> str | None:
        from .train import BUILD_ESTIMATE, embedded_sae_ready

        if self.source().kind != "embedded" or embedded_sae_ready():
            return None
        return f"the embedded SAE (trained once and cached; {BUILD_ESTIMATE})"

    # ------------------------------------------------------------------ propose
    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> list[Proposal]:
        if not contexts:
            return []
        d_model = contexts[0].d_model
        layer = int(getattr(runtime, "layer", self.layer))
        families = ("original", *PROPOSAL_FAMILIES)

        readout: Readout | None = None
        fam_tokens: dict[tuple[int, str], list[int]] = {}
        extra_acts: torch.Tensor | None = None
        extra_rhymes: list[str] = []
        with runtime.base() as lm:  # before the SAE loads; keep only small tensors
            if self.selection == "unembed":
                for i, ctx in enumerate(contexts):
                    for fam in families:
                        fam_tokens[(i, fam)] = family_token_ids(lm.tokenizer,
                                                                ctx.prompt.families[fam])
                all_ids = [t for ids in fam_tokens.values() for t in ids]
                readout = Readout.build(lm.model.get_output_embeddings().weight, all_ids,
                                        final_norm_gain(lm.model))
            elif self.contrast_couplets:
                extra_acts, extra_rhymes = self._contrast_activations(contexts, layer, runtime)

        resource = self._resource(d_model)
        with runtime.load(resource) as sae:
            check_compatible(hook_name=(sae.cfg.metadata.hook_name if sae.cfg.metadata else None),
                             d_in=int(sae.cfg.d_in), layer=layer, d_model=d_model,
                             what=resource.source, sae_id=self.source().sae_id)
            with torch.no_grad():
                W_dec = sae.W_dec.detach().float().cpu()
                plan_codes = sae.encode(torch.stack([c.activation for c in contexts]).float()
                                        ).float().cpu()
                max_act = torch.zeros(W_dec.shape[0])
                for ctx in contexts:  # every token but BOS: the "up" scale, not a selection
                    acts = sae.encode(ctx.resid[1:].float()).float().cpu()
                    max_act = torch.maximum(max_act, acts.max(0).values)
                extra_codes = (sae.encode(extra_acts).float().cpu() if extra_acts is not None
                               else torch.zeros(0, W_dec.shape[0]))
            up_values = self._up_values(max_act)

            rhymes = [ctx.prompt.rhyme or _rhyme_of(ctx.prompt.families["original"])
                      for ctx in contexts]
            all_codes = torch.cat([plan_codes, extra_codes])
            all_rhymes = rhymes + list(extra_rhymes)

            proposals: list[Proposal] = []
            rows: list[dict[str, Any]] = []
            for i, ctx in enumerate(contexts):
                sel: dict[str, Selection] = {}
                for fam in families:
                    if self.selection == "unembed":
                        assert readout is not None
                        sel[fam] = select_unembed(W_dec, readout, fam_tokens[(i, fam)], self.k)
                    else:
                        fam_rhyme = (rhymes[i] if fam in ("original", "edited")
                                     else _rhyme_of(ctx.prompt.families[fam]))
                        sel[fam] = select_contrast(all_codes, all_rhymes, fam_rhyme, self.k,
                                                   hold_out=[i])
                    for rank, (f, s) in enumerate(zip(sel[fam].features, sel[fam].scores,
                                                      strict=True)):
                        rows.append({"prompt_id": ctx.prompt.id, "family": fam,
                                     "rule": self.selection, "mode": self.mode, "rank": rank,
                                     "feature": f, "score": s, "up_value": float(up_values[f]),
                                     "plan_activation": float(plan_codes[i, f]),
                                     "note": sel[fam].note})
                proposals += self._prompt_proposals(sae, W_dec, ctx, sel, up_values, resource.source)
        runtime.write_table("features", rows)
        return proposals

    def _up_values(self, max_act: torch.Tensor) -> torch.Tensor:
        """Each feature's "up" value: its largest activation over the battery's tokens (features
        never active get the median of the active ones), times ``strength``."""
        fallback_up = float(max_act[max_act > 0].median()) if bool((max_act > 0).any()) else 1.0
        return torch.where(max_act > 0, max_act, torch.full_like(max_act, fallback_up)) * float(self.strength)

    def _prompt_proposals(self, sae: Any, w_dec: torch.Tensor, ctx: PromptContext, sel: Mapping[str, Selection], up_values: torch.Tensor,
                          source: str) -> list[Proposal]:
        """One prompt's proposals: each family's selected features, swapped in for the original
        family's or added, as a delta (dropped when nothing was selected)."""
        orig = sel["original"]
        proposals = []
        for fam in PROPOSAL_FAMILIES:
            target = sel[fam]
            meta = {"rule": self.selection, "mode": self.mode, "sae": source,
                    "k": self.k, "strength": float(self.strength),
                    "features": list(target.features), "scores": list(target.scores),
                    "original_features": list(orig.features),
                    "original_scores": list(orig.scores), "note": target.note}
            if not target.features:
                proposals.append(Proposal(ctx.prompt.id, fam, status="dropped",
                                          meta={**meta, "reason": "no feature selected"}))
                continue
            if self.mode == "feature_swap":
                delta = feature_swap_delta(sae, ctx.activation, orig.features, target.features, up_values)
            else:
                delta = additive_delta(w_dec, target.features, target.scores, up_values)
            proposals.append(Proposal(ctx.prompt.id, fam, delta=delta.to(torch.float32).contiguous(), meta=meta))
        return proposals

    def _contrast_activations(self, contexts: Sequence[PromptContext], layer: int,
                              runtime: MethodRuntime) -> tuple[torch.Tensor, list[str]]:
        """Planning-position activations of generated couplets for rule (b), every battery word
        excluded (so no battery prompt, in particular the scored one, is among them)."""
        banned = sorted({w for c in contexts for ws in c.prompt.families.values() for w in ws}
                        | {c.prompt.line_end_word for c in contexts})
        seed = int(getattr(runtime, "seed", 0))
        couplets = make_couplets(int(self.contrast_couplets), seed, exclude=banned)
        chat = self.settings.chat_template
        key = {"layer": layer, "model": self._model_id(), "n": len(couplets), "seed": seed,
               "chat": chat, "banned": hashlib.sha256(json.dumps(banned).encode()).hexdigest()[:16]}

        def compute() -> list[list[float]]:
            acts = runtime.capture([c.text for c in couplets], ["first_line_break"] * len(couplets), layer=layer)
            return [a.tolist() for a in acts]

        acts = runtime.cached("sae_contrast_activations", key, compute)
        return torch.tensor(acts, dtype=torch.float32), [c.rhyme for c in couplets]
