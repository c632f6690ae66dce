"""Built-in controls: each derives its condition from the method's target proposal.

``noop`` (zero delta: the unsteered baseline), ``random_delta`` (a random direction with the
target delta's norm, seeded per run, method and prompt) and ``wrong_position`` (the target
delta at a neighbouring token). ``unrelated_edit`` is not here: it is the method's own
proposal toward the unrelated family, so every method gets it from the runner.

Two more apply to text-edit methods only (methods that propose the companion families,
:data:`steercmp.api.COMPANION_FAMILIES`): ``paraphrase_edit`` (a meaning-preserving rewording of
the explanation through the reconstructor: an edit is semantic only if it beats this) and
``round_trip`` (the activation replaced once by the reconstruction of its own explanation: how
much of the behaviour survives the pair).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from steercmp.api import ConfigError, Control, Method, PromptContext, Proposal
from steercmp.hookspecs import hookimpl


class Noop(Control):
    name = "noop"
    description = "zero delta at the target position: the unsteered baseline"
    matching = "baseline"

    def derive(self, target: Proposal, context: PromptContext, generator: torch.Generator) -> Proposal:
        d = context.d_model
        return Proposal(prompt_id=target.prompt_id, family=target.family, delta=torch.zeros(d),
                        position=context.inject_pos, status="ok", meta={"zero_by_design": True})


class RandomDelta(Control):
    name = "random_delta"
    description = ("random directions: in the alpha sweep one draw at the target delta's norm (a destruction "
                   "diagnostic); in the verdict K isotropic draws per prompt, each dose-matched to the budget")
    matching = "shared"

    def applies_to(self, method: Method) -> bool:
        return method.intervention == "activation"

    def derive_shared(self, context: PromptContext, others: Sequence[PromptContext], generator: torch.Generator,
                      draw: int) -> Proposal:
        direction = torch.randn(context.d_model, generator=generator, dtype=torch.float32)
        return Proposal(prompt_id=context.prompt.id, family="edited", delta=direction / direction.norm(),
                        position=context.inject_pos, status="ok", meta={"draw": draw})

    def derive(self, target: Proposal, context: PromptContext, generator: torch.Generator) -> Proposal:
        assert target.delta is not None
        direction = torch.randn(target.delta.shape, generator=generator, dtype=torch.float32)
        delta = direction / direction.norm() * target.delta.float().norm()
        return attrs.evolve(target, delta=delta, meta={"matched_norm": float(target.delta.float().norm())})


class RandomDonor(Control):
    name = "random_donor"
    description = ("an on-manifold random control: the patch from another prompt of the run (h_j - h_i at the "
                   "site), dose-matched to the budget; K donors per prompt")
    matching = "shared"

    def applies_to(self, method: Method) -> bool:
        return False  # no alpha-sweep cells: it exists only at matched dose

    def derive(self, target: Proposal, context: PromptContext, generator: torch.Generator) -> Proposal:
        raise NotImplementedError("random_donor has no alpha-sweep cells")

    def derive_shared(self, context: PromptContext, others: Sequence[PromptContext], generator: torch.Generator,
                      draw: int) -> Proposal:
        donors = [o for o in others if o.prompt.id != context.prompt.id]
        if not donors:
            return Proposal(prompt_id=context.prompt.id, family="edited", status="dropped",
                            meta={"why": "no other prompt to take a donor from"})
        # the donors after this prompt in battery order, cyclically: the same for every method and run
        ids = [o.prompt.id for o in others]
        start = ids.index(context.prompt.id) if context.prompt.id in ids else -1
        ring = [others[(start + 1 + k) % len(others)] for k in range(len(others))]
        donor = [o for o in ring if o.prompt.id != context.prompt.id][draw % len(donors)]
        delta = (donor.activation.float() - context.activation.float()).contiguous()
        return Proposal(prompt_id=context.prompt.id, family="edited", delta=delta, position=context.inject_pos,
                        status="ok", meta={"draw": draw, "donor": donor.prompt.id})


class WrongPosition(Control):
    name = "wrong_position"
    description = "the target delta injected at a neighbouring token (offset option, default -1)"

    def __init__(self, options):
        super().__init__(options)
        offset = self.options.get("offset", -1)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset == 0:
            raise ConfigError(f"wrong_position offset {offset!r} must be a non-zero integer",
                              where="control_options.wrong_position.offset", fix="use e.g. -1 or 1")
        self.offset = offset

    def applies_to(self, method: Method) -> bool:
        return method.intervention == "activation"

    def derive(self, target: Proposal, context: PromptContext, generator: torch.Generator) -> Proposal:
        base = target.position if target.position is not None else context.inject_pos
        pos = base + self.offset
        if not 0 <= pos <= context.score_pos:
            raise ConfigError(
                f"wrong_position offset {self.offset} puts prompt {context.prompt.id!r} at token {pos}, "
                f"outside 0..{context.score_pos}",
                where="control_options.wrong_position.offset", fix="use a smaller offset")
        return attrs.evolve(target, position=pos, meta={"offset": self.offset})


class ParaphraseEdit(Control):
    name = "paraphrase_edit"
    description = "text-edit methods: a meaning-preserving rewording of the explanation, through the reconstructor"
    companion = "paraphrase"

    def derive(self, target: Proposal, context: PromptContext, generator: torch.Generator) -> Proposal:
        return target  # the method's paraphrase proposal, injected like the target


class RoundTrip(Control):
    name = "round_trip"
    description = ("text-edit methods: the activation replaced once (alpha 1) by the reconstruction of "
                   "its own explanation at the activation's norm (a fidelity diagnostic, not in the verdict)")
    companion = "round_trip"
    matching = "descriptive"

    def derive(self, target: Proposal, context: PromptContext, generator: torch.Generator) -> Proposal:
        if target.fixed_alpha is None:
            return attrs.evolve(target, fixed_alpha=1.0)  # a replacement is one operation, never a dose
        return target


@hookimpl
def register_controls(register):
    register(Noop)
    register(RandomDelta)
    register(RandomDonor)
    register(WrongPosition)
    register(ParaphraseEdit)
    register(RoundTrip)
