"""``diffmean``: mean-difference steering (contrastive activation addition, CAA), a built-in.

AxBench found it the strongest simple baseline; every comparison carries it.

``delta = mean(h at the planning position | lines ending in target-family words)
        - mean(h at the planning position | lines ending in original-family words)``

The contrastive texts are the battery's own couplets with the first line's last word swapped
(``...beside the stream,`` -> ``...beside the gleam,``), so positives and negatives differ in one
word and the difference isolates "the line ended on the target word". Activations come from the
base model at the position the prompt's own ``inject`` rule names (the first line break) and the
experiment's layer, read with :meth:`steercmp.api.MethodRuntime.capture` (a plugin never
registers hooks itself).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steercmp.api import (
    PROPOSAL_FAMILIES,
    ConfigError,
    Method,
    MethodRuntime,
    Prompt,
    PromptContext,
    Proposal,
    swap_line_end,
)
from steercmp.hookspecs import hookimpl


def mean_difference(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """The CAA direction: ``mean(positives) - mean(negatives)``, both ``[n, d_model]``."""
    return positives.float().mean(0) - negatives.float().mean(0)


class DiffMean(Method):
    name = "diffmean"
    description = "mean-difference (CAA) direction: couplets ending in target vs original words"

    def validate(self) -> None:
        unknown = sorted(set(self.options) - {"contexts", "norm_fraction", "batch_size"})
        if unknown:
            raise ConfigError(f"unknown diffmean option {unknown[0]!r}",
                              where=f"methods.diffmean.options.{unknown[0]}",
                              fix="valid options are batch_size, contexts, norm_fraction")
        if self.options.get("contexts", "all") not in ("all", "own"):
            raise ConfigError(f"contexts {self.options['contexts']!r} must be all or own",
                              where="methods.diffmean.options.contexts", fix="use all or own")
        frac = self.options.get("norm_fraction")
        if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or frac <= 0):
            raise ConfigError(f"norm_fraction {frac!r} must be a positive number or null",
                              where="methods.diffmean.options.norm_fraction", fix="use e.g. 0.25, or null")

    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> Sequence[Proposal]:
        own_only = self.options.get("contexts", "all") == "own"
        frac = self.options.get("norm_fraction")
        batch_size = int(self.options.get("batch_size", 32))  # short rows: the texts share their prefixes
        prompts = [c.prompt for c in contexts]

        def templates(ctx: PromptContext) -> list[Prompt]:
            return [ctx.prompt] if own_only else prompts

        # every (template prompt, word) activation any proposal needs, computed once
        wanted: dict[tuple[str, str], Prompt] = {}
        for ctx in contexts:
            fams = ctx.prompt.families
            for tmpl in templates(ctx):
                for fam in ("original", *PROPOSAL_FAMILIES):
                    for word in fams[fam]:
                        wanted[(tmpl.id, word)] = tmpl
        acts = self._activations(wanted, runtime, batch_size)

        out = []
        for ctx in contexts:
            fams = ctx.prompt.families
            tmpl_ids = [t.id for t in templates(ctx)]

            def stack(words: Sequence[str], tmpl_ids: list[str] = tmpl_ids,
                      pid: str = ctx.prompt.id) -> torch.Tensor:
                rows = [acts[(t, w)] for t in tmpl_ids for w in words if (t, w) in acts]
                if not rows:
                    raise ConfigError(f"diffmean found no usable contrastive text for {pid!r}",
                                      where=f"battery: {pid}",
                                      fix="end the first line of the couplet with a word and a line break")
                return torch.stack(rows)

            negatives = stack(fams["original"])
            for family in PROPOSAL_FAMILIES:
                positives = stack(fams[family])
                delta = mean_difference(positives, negatives)
                raw_norm = float(delta.norm())
                if frac is not None and raw_norm > 0:
                    delta = delta / raw_norm * float(frac) * float(ctx.activation.norm())
                out.append(Proposal(prompt_id=ctx.prompt.id, family=family, delta=delta.float().contiguous(),
                                    meta={"n_positive": int(positives.shape[0]),
                                          "n_negative": int(negatives.shape[0]),
                                          "raw_norm": raw_norm, "norm_fraction": frac}))
        return out

    def _activations(self, wanted: dict[tuple[str, str], Prompt], runtime: MethodRuntime,
                     batch_size: int) -> dict[tuple[str, str], torch.Tensor]:
        """Each (template prompt, word) text's activation at the template's injection rule; a text
        whose rule no longer resolves after the swap is skipped."""
        items = [(key, text, tmpl.inject) for key, tmpl in wanted.items()
                 if (text := swap_line_end(tmpl.text, key[1])) is not None]
        try:
            vectors = runtime.capture([t for _, t, _ in items], [r for _, _, r in items], batch_size=batch_size)
            return {key: vec for (key, _, _), vec in zip(items, vectors, strict=True)}
        except ConfigError:  # some swapped text broke its position rule: keep the others
            acts: dict[tuple[str, str], torch.Tensor] = {}
            for key, text, rule in items:
                try:
                    acts[key] = runtime.capture([text], [rule])[0]
                except ConfigError:
                    continue
            return acts


@hookimpl
def register_methods(register):
    register(DiffMean)
