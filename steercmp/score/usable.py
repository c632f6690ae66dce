"""Which battery prompts can show a steering effect at all, decided before any steering.

The pre-declared rule (docs/embedded.md), measured on the unsteered model only:

1. the model prefers its own rhyme: at the rhyme slot, ``logmass(original) > logmass(edited)``
   (the score ``edited - original`` is negative), so there is a plan to move;
2. the rhyme is under the first line's control: the counterfactual couplet, whose first line
   ends with the edited family's cue word (:mod:`steercmp.lm.couplet_counterfactual`), scores higher
   than the original couplet. A prompt whose second line alone fixes the word (``never said a
   ___``) fails this: no intervention on the rhyme plan can change its answer.

No method's output enters the rule, so it cannot favour one method over another.
"""

from __future__ import annotations

import polars as pl
import torch

from steercmp.battery import Battery
from steercmp.errors import ConfigError
from steercmp.lm.couplet_counterfactual import build_counterfactual
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import tokenize_prompt
from steercmp.score.forms import family_forms
from steercmp.score.full_forward import ScoreRow
from steercmp.score.sweep import score_rows_fast

RULE = ("usable iff (1) logmass(original) > logmass(edited) at the rhyme slot of the unsteered couplet and "
        "(2) the counterfactual couplet (line 1 ending in the edited family's cue word) raises "
        "logmass(edited) - logmass(original)")


def usability(lm: LoadedModel, battery: Battery, layer: int, *, chat_template: bool = False,
              construction: str | None = None) -> pl.DataFrame:
    """One row per prompt: the unsteered score, the counterfactual's word and score, and the
    verdict of :data:`RULE` with the reason."""
    rows, meta = [], []
    zero = torch.zeros(lm.d_model)
    for prompt in battery.prompts:
        forms = family_forms(lm.tokenizer, prompt.families)
        tok = tokenize_prompt(lm.tokenizer, prompt, chat_template)
        try:
            cf = build_counterfactual(lm.tokenizer, prompt, "edited", construction, chat_template=chat_template,
                                      where=battery.source)
        except ConfigError as exc:
            meta.append((prompt.id, None, exc.message))
            continue
        rows += [ScoreRow(tok.ids, tok.score_pos, forms, zero, 0.0, tok.inject_pos, "raw"),
                 ScoreRow(cf.tokens.ids, cf.tokens.score_pos, forms, zero, 0.0, cf.tokens.inject_pos, "raw")]
        meta.append((prompt.id, cf, None))
    masses = score_rows_fast(lm, layer, rows) if rows else {"edited": torch.zeros(0), "original": torch.zeros(0)}
    scores = (masses["edited"] - masses["original"]).tolist()
    out, j = [], 0
    for pid, cf, problem in meta:
        if cf is None:
            out.append({"prompt_id": pid, "baseline": None, "cue_word": None, "counterfactual": None, "usable": False,
                        "reason": problem})
            continue
        base, moved = scores[j], scores[j + 1]
        j += 2
        why = []
        if not base < 0:
            why.append("the edited family already outranks the original at baseline")
        if not moved > base:
            why.append("the counterfactual first line does not move the score (line 2 fixes the word)")
        out.append({"prompt_id": pid, "baseline": base, "cue_word": cf.word, "counterfactual": moved,
                    "usable": not why, "reason": "; ".join(why) or "usable"})
    return pl.DataFrame(out, schema={"prompt_id": pl.String, "baseline": pl.Float64, "cue_word": pl.String,
                                     "counterfactual": pl.Float64, "usable": pl.Boolean, "reason": pl.String})


__all__ = ["RULE", "usability"]
