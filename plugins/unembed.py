"""A simple real method: push the residual toward the edited family's unembedding directions.

``delta = unit(mean_u(target family) - mean_u(original family)) * norm_fraction * ||h||``
where ``u(w)`` is the output-embedding row of the word's leading-space token scaled by the final
norm's gain (:func:`steercmp.lm.readout.readout_directions`, which also reads the gain inside
Gemma 3's multimodal wrapper). No extra model: it reads the base model's own readout.
"""

from __future__ import annotations

from steercmp.api import PROPOSAL_FAMILIES, ConfigError, Method, Proposal, readout_directions
from steercmp.hookspecs import hookimpl


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
