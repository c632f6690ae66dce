"""Activation addition (ActAdd) from a prompt pair, as a third-party steercmp method plugin.

Turner et al. (2023), "Activation Addition: Steering Language Models Without Optimization":
the steering vector is the difference of the residual stream on two short prompts that differ
only in the concept to add. Here the pair names a target-family word and the original-family
word it replaces (``template`` formatted with each), read at the last token:

``delta = mean_i [ h(template(target_i)) - h(template(original_i)) ]``

Everything goes through the public API: activations come from
:meth:`steercmp.api.MethodRuntime.capture` (a plugin never registers hooks), the shared engine
injects the delta at the prompt's planning position and scores it like every other method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steercmp.api import (
    PROPOSAL_FAMILIES,
    ConfigError,
    Method,
    MethodRuntime,
    PromptContext,
    Proposal,
)
from steercmp.hookspecs import hookimpl

__version__ = "0.1.0"
OPTIONS = ("template", "norm_fraction")


class ActAdd(Method):
    name = "actadd"
    description = "activation addition: h(prompt naming the target word) - h(prompt naming the original word)"

    def validate(self) -> None:
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown actadd option {unknown[0]!r}", where=f"methods.actadd.options.{unknown[0]}",
                              fix=f"valid options are {', '.join(OPTIONS)}")
        template = self.options.get("template", "{word}")
        if not isinstance(template, str) or "{word}" not in template:
            raise ConfigError(f"template {template!r} must be a string containing {{word}}",
                              where="methods.actadd.options.template", fix='use e.g. "{word}" or "It rhymes with {word}"')
        frac = self.options.get("norm_fraction")
        if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or frac <= 0):
            raise ConfigError(f"norm_fraction {frac!r} must be a positive number or null",
                              where="methods.actadd.options.norm_fraction", fix="use e.g. 0.25, or null")

    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> Sequence[Proposal]:
        template = self.options.get("template", "{word}")
        frac = self.options.get("norm_fraction")
        out = []
        for ctx in contexts:
            fams = ctx.prompt.families
            for family in PROPOSAL_FAMILIES:
                pairs = list(zip(fams[family], fams["original"], strict=False))  # aligned word pairs
                texts = [template.format(word=w) for pair in pairs for w in pair]
                acts = runtime.capture(texts, [-1] * len(texts))
                delta = torch.stack([acts[2 * i] - acts[2 * i + 1] for i in range(len(pairs))]).mean(0)
                raw_norm = float(delta.norm())
                if frac is not None and raw_norm > 0:
                    delta = delta / raw_norm * float(frac) * float(ctx.activation.norm())
                out.append(Proposal(prompt_id=ctx.prompt.id, family=family, delta=delta.float().contiguous(),
                                    meta={"pairs": [list(p) for p in pairs], "template": template,
                                          "raw_norm": raw_norm, "norm_fraction": frac}))
        return out


@hookimpl
def register_methods(register):
    register(ActAdd)
