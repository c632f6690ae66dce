"""The positive control and the ceiling: what a known-working intervention achieves at the site.

``counterfactual_patch`` (the positive control) proposes ``h_cf - h`` at the experiment's layer
and injection position, where ``h_cf`` is the residual of the counterfactual couplet, the same
couplet whose first line ends with a word that moves the plan to the target family
(:mod:`steercmp.lm.couplet_counterfactual`). At alpha 1 (raw scaling) it IS activation patching: if the
plan lives at that site, the score moves; if even this does not move it, no method injecting
there can be expected to. ``counterfactual_text`` (the ceiling) scores the counterfactual couplet
itself: how far any intervention, at any site, could move the score.

A prompt with no counterfactual of its own token length (no candidate word keeps the couplet's
positions under this tokenizer) is dropped for that family by both, visibly, with the reason in
``meta.reason``: the run goes on without a patch (and so without a budget) for that prompt.

Both mark their proposals with ``meta.role`` (``positive_control`` / ``ceiling``): the report
puts them on top and shows every method's effect as a fraction of the positive control's.
"""

from __future__ import annotations

from collections.abc import Sequence

from steercmp.api import (
    CONSTRUCTIONS,
    PROPOSAL_FAMILIES,
    ConfigError,
    Method,
    MethodRuntime,
    NoCounterfactual,
    PromptContext,
    Proposal,
    build_counterfactual,
)
from steercmp.hookspecs import hookimpl

OPTIONS = ("construction",)


class _Counterfactual(Method):
    """Shared options: ``construction`` (``auto``: swap for a same-rhyme family, cue otherwise)."""

    def validate(self) -> None:
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown {self.name} option {unknown[0]!r}",
                              where=f"methods.{self.name}.options.{unknown[0]}", fix="the only option is construction")
        construction = self.options.get("construction", "auto")
        if construction != "auto" and construction not in CONSTRUCTIONS:
            raise ConfigError(f"construction {construction!r} is not one of auto, {', '.join(CONSTRUCTIONS)}",
                              where=f"methods.{self.name}.options.construction", fix="use auto, cue, swap or block")

    def _counterfactuals(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> list:
        """``(context, family, counterfactual or the reason there is none)`` per prompt and family."""
        construction = self.options.get("construction", "auto")
        chat = self.settings.chat_template
        source = self.settings.battery_source
        out = []
        with runtime.base() as lm:
            for ctx in contexts:
                for family in PROPOSAL_FAMILIES:
                    try:
                        cf = build_counterfactual(lm.tokenizer, ctx.prompt, family,
                                                  None if construction == "auto" else construction,
                                                  chat_template=chat, where=source)
                    except NoCounterfactual as exc:
                        cf = exc.message
                    out.append((ctx, family, cf))
        return out

    @staticmethod
    def _meta(role: str, cf) -> dict:  # noqa: ANN001
        return {"role": role, "construction": cf.construction, "word": cf.word, "counterfactual": cf.text}

    @staticmethod
    def _dropped(role: str, ctx: PromptContext, family: str, reason: str) -> Proposal:
        return Proposal(prompt_id=ctx.prompt.id, family=family, status="dropped", meta={"role": role, "reason": reason})


class CounterfactualPatch(_Counterfactual):
    name = "counterfactual_patch"
    description = "positive control: patch the counterfactual couplet's residual at the site (h_cf - h)"

    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> Sequence[Proposal]:
        cfs = self._counterfactuals(contexts, runtime)
        found = [(ctx, family, cf) for ctx, family, cf in cfs if not isinstance(cf, str)]
        acts = iter(runtime.capture([cf.text for _c, _f, cf in found], [ctx.inject_pos for ctx, _f, _cf in found])
                    if found else [])
        # a patch is one operation, not a dose: every alpha cell injects it once (alpha 1)
        return [self._dropped("positive_control", ctx, family, cf) if isinstance(cf, str) else
                Proposal(prompt_id=ctx.prompt.id, family=family, delta=(next(acts) - ctx.activation.float()).contiguous(),
                         meta=self._meta("positive_control", cf), fixed_alpha=1.0)
                for ctx, family, cf in cfs]


class CounterfactualText(_Counterfactual):
    name = "counterfactual_text"
    intervention = "prompt"
    description = "ceiling: the counterfactual couplet itself (how far any intervention could move the score)"

    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> Sequence[Proposal]:
        return [self._dropped("ceiling", ctx, family, cf) if isinstance(cf, str) else
                Proposal(prompt_id=ctx.prompt.id, family=family, prompt_text=cf.text, meta=self._meta("ceiling", cf))
                for ctx, family, cf in self._counterfactuals(contexts, runtime)]


@hookimpl
def register_methods(register):
    register(CounterfactualPatch)
    register(CounterfactualText)
