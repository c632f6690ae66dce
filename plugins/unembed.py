"""A simple real method: push the residual toward the edited family's unembedding directions.

``delta = unit(mean_u(target family) - mean_u(original family)) * norm_fraction * ||h||``
where ``u(w)`` is the output-embedding row of the word's leading-space token scaled by the final
norm's gain. No extra model: it reads the base model's own readout, so it needs only the base.
"""

from __future__ import annotations

import torch

from steercmp.api import PROPOSAL_FAMILIES, Method, Proposal
from steercmp.battery import encode_form
from steercmp.errors import ConfigError
from steercmp.hookspecs import hookimpl


def readout_directions(lm, words) -> torch.Tensor:
    """Residual-space directions that raise each word's leading-space first token's logit."""
    w_u = lm.model.get_output_embeddings().weight.detach().float()
    norm = getattr(getattr(lm.model, "model", lm.model), "norm", None)
    gain = None
    if norm is not None and getattr(norm, "weight", None) is not None:
        # Gemma's RMSNorm multiplies by (1 + weight); other families by weight
        w = norm.weight.detach().float()
        gain = 1.0 + w if "Gemma" in type(norm).__name__ else w
    rows = []
    for word in words:
        tok = encode_form(lm.tokenizer, " " + word)[0]
        row = w_u[tok]
        rows.append(row * gain if gain is not None else row)
    return torch.stack(rows)


class UnembedDirection(Method):
    name = "unembed_direction"
    description = "difference of mean unembedding directions, target family minus original family"

    def validate(self) -> None:
        frac = self.options.get("norm_fraction", 0.25)
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or frac <= 0:
            raise ConfigError(f"norm_fraction {frac!r} must be a positive number",
                              where="methods.unembed_direction.options.norm_fraction", fix="use e.g. 0.25")

    def propose(self, contexts, runtime):
        frac = float(self.options.get("norm_fraction", 0.25))
        out = []
        with runtime.base() as lm:
            for ctx in contexts:
                fams = ctx.prompt.families
                orig = readout_directions(lm, fams["original"]).mean(0)
                h_norm = float(ctx.activation.norm())
                for family in PROPOSAL_FAMILIES:
                    direction = readout_directions(lm, fams[family]).mean(0) - orig
                    delta = direction / direction.norm() * frac * h_norm
                    out.append(Proposal(prompt_id=ctx.prompt.id, family=family, delta=delta,
                                        meta={"norm_fraction": frac, "words": list(fams[family])}))
        return out


@hookimpl
def register_methods(register):
    register(UnembedDirection)
