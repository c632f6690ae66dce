"""Proposals: the one check every method's output passes, and their storage in a run directory.

The runner and the conformance kit (:mod:`steercmp.testing`) call the same
:func:`check_proposals`, so a plugin that passes the kit passes the runner.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch

from steercmp.api import PROPOSAL_FAMILIES, PROPOSAL_STATUSES, PromptContext, Proposal
from steercmp.errors import ConfigError, PluginError
from steercmp.lm.prompts import tokenize_prompt
from steercmp.run.rundir import RunDir, read_json, read_tensors, write_json, write_tensors

#: statuses whose delta may be zero under any scaling: a fallback prompt had nothing to edit
ZERO_OK_STATUSES = ("fallback",)


class ProposalError(PluginError):
    """A proposal that breaks the contract; ``check`` names the rule (the kit reports it)."""

    def __init__(self, check: str, message: str, *, fix: str | None = None):
        self.check = check
        super().__init__(message, fix=fix)


@attrs.frozen
class ProposalContract:
    """What one method's proposals must be: of its ``intervention`` (``activation`` or
    ``prompt``), one per prompt and family of ``families``, scored under ``scalings`` (a
    ``norm_relative`` scaling divides by the delta's norm, so deltas must be non-zero unless
    ``zero_ok`` says otherwise), prompt texts read with or without the ``chat_template``."""

    scalings: tuple[str, ...]
    intervention: str = "activation"
    families: tuple[str, ...] = PROPOSAL_FAMILIES
    chat_template: bool = False
    zero_ok: bool | None = None


def check_proposals(method: str, proposals: Any, contexts: Sequence[PromptContext], contract: ProposalContract,
                    *, tokenizer: Any = None) -> list[Proposal]:
    """Check a method's proposals against its ``contract`` and return them as a list.

    One :class:`Proposal` per prompt and family in ``families``, no duplicates or strangers, a
    known status and JSON meta. A non-dropped activation proposal carries a finite float32 CPU
    ``[d_model]`` delta at a position inside ``0..score_pos``, with a non-zero norm when a
    ``norm_relative`` scaling needs ``delta/||delta||`` (``zero_ok`` overrides). A prompt
    proposal carries non-empty text; given a ``tokenizer`` the text must resolve the prompt's
    position rules and keep its scoring slot. Raises :class:`ProposalError`.
    """
    if isinstance(proposals, (str, bytes)) or not isinstance(proposals, Iterable):
        raise ProposalError("proposals", f"method {method!r} returned {type(proposals).__name__}, "
                                         "not a list of proposals", fix="return a list of Proposal objects")
    proposals = list(proposals)
    families, zero_ok = contract.families, contract.zero_ok
    allowed = list(dict.fromkeys([*PROPOSAL_FAMILIES, *families]))
    have: dict[tuple[str, str], Proposal] = {}
    known = {c.prompt.id for c in contexts}
    for p in proposals:
        if not isinstance(p, Proposal):
            raise ProposalError("proposals", f"method {method!r} returned {type(p).__name__}, not a "
                                             "steercmp.api.Proposal", fix="return Proposal objects")
        if p.prompt_id not in known:
            raise ProposalError("proposals", f"method {method!r} returned a proposal for unknown prompt "
                                             f"{p.prompt_id!r}", fix="propose only for the contexts you were given")
        if p.family not in allowed:
            raise ProposalError("families", f"method {method!r} proposed for family {p.family!r}",
                                fix=f"families are {', '.join(allowed)} (companion families need "
                                    "Method.companion_families)")
        if (p.prompt_id, p.family) in have:
            raise ProposalError("proposals", f"method {method!r} returned two proposals for prompt "
                                             f"{p.prompt_id!r}, family {p.family!r}",
                                fix="return one Proposal per prompt and family")
        have[(p.prompt_id, p.family)] = p
    if zero_ok is None:
        zero_ok = "norm_relative" not in contract.scalings
    for ctx in contexts:
        for fam in families:
            p = have.get((ctx.prompt.id, fam))
            if p is None:
                raise ProposalError("families", f"method {method!r} returned no proposal for prompt "
                                                f"{ctx.prompt.id!r}, family {fam!r}",
                                    fix="return one Proposal per prompt and family")
            _check_one(method, p, ctx, contract, tokenizer, zero_ok)
    return proposals


def _check_one(method: str, p: Proposal, ctx: PromptContext, contract: ProposalContract, tokenizer: Any,
               zero_ok: bool) -> None:
    where = f"method {method!r}, {ctx.prompt.id}/{p.family}"
    if p.status not in PROPOSAL_STATUSES:
        raise ProposalError("proposals", f"{where}: status {p.status!r} is not one of {PROPOSAL_STATUSES}",
                            fix="use a documented status")
    try:
        json.dumps(dict(p.meta), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ProposalError("proposals", f"{where}: meta is not JSON-serialisable ({exc})",
                            fix="store plain numbers, strings, lists and dicts in meta") from None
    if p.fixed_alpha is not None and (isinstance(p.fixed_alpha, bool) or not isinstance(p.fixed_alpha, int | float)
                                      or not math.isfinite(p.fixed_alpha)):
        raise ProposalError("proposals", f"{where}: fixed_alpha {p.fixed_alpha!r} is not a finite number",
                            fix="leave fixed_alpha None (swept) or give e.g. 1.0")
    if p.status == "dropped":
        return
    if contract.intervention == "prompt":
        _check_prompt_text(where, p, ctx, tokenizer, contract.chat_template)
        return
    if p.delta is None:
        raise ProposalError("shape", f"{where}: an activation method must set delta (got prompt_text)",
                            fix="return a [d_model] delta")
    if not isinstance(p.delta, torch.Tensor):
        raise ProposalError("shape", f"{where}: delta is {type(p.delta).__name__}, not a torch.Tensor",
                            fix="return a [d_model] torch.Tensor")
    if tuple(p.delta.shape) != (ctx.d_model,):
        raise ProposalError("shape", f"{where}: delta has shape {tuple(p.delta.shape)}, expected "
                                     f"({ctx.d_model},)", fix="return a [d_model] vector")
    if p.delta.dtype != torch.float32 or p.delta.device.type != "cpu":
        raise ProposalError("dtype", f"{where}: delta is {p.delta.dtype} on {p.delta.device}",
                            fix="return a float32 CPU tensor (delta.float().cpu())")
    if not bool(torch.isfinite(p.delta).all()):
        raise ProposalError("finite", f"method {method!r} proposed a delta with NaN or inf for "
                                      f"{ctx.prompt.id!r}/{p.family}", fix="check the method's inputs")
    if not zero_ok and p.status not in ZERO_OK_STATUSES and float(p.delta.norm()) == 0.0:
        raise ProposalError(
            "finite", f"method {method!r} proposed a zero-norm delta for {ctx.prompt.id!r}/{p.family} "
                      "under norm_relative scaling (delta/||delta|| is undefined)",
            fix="use scalings: [raw], or a stricter selection that drops such prompts")
    if p.position is not None and not (isinstance(p.position, int) and 0 <= p.position <= ctx.score_pos):
        raise ProposalError("shape", f"{where}: position {p.position!r} is outside 0..{ctx.score_pos}",
                            fix="inject at or before the scoring slot")


def _check_prompt_text(where: str, p: Proposal, ctx: PromptContext, tokenizer: Any, chat_template: bool) -> None:
    if p.delta is not None:
        raise ProposalError("shape", f"{where}: a prompt method must set prompt_text, not delta",
                            fix="return Proposal(prompt_text=...)")
    if not isinstance(p.prompt_text, str) or not p.prompt_text.strip():
        raise ProposalError("shape", f"{where}: prompt_text is empty", fix="return the full prompt text")
    if tokenizer is None:
        return
    try:
        tok = tokenize_prompt(tokenizer, ctx.prompt, chat_template, text=p.prompt_text)
    except ConfigError as exc:
        raise ProposalError("shape", f"{where}: prompt_text does not resolve the prompt's position "
                                     f"rules ({exc.message})", fix="keep the couplet's line break") from None
    if tok.ids[tok.score_pos] != ctx.input_ids[ctx.score_pos]:
        raise ProposalError("shape", f"{where}: prompt_text does not keep the original scoring slot "
                                     "(the token before the rhyme word)", fix="end the text with the original prompt")


def save_proposals(run: RunDir, method: str, proposals: Sequence[Proposal]) -> None:
    tensors = {f"{p.prompt_id}|{p.family}": p.delta.float() for p in proposals if p.delta is not None}
    if not tensors:
        tensors = {"__empty__": torch.zeros(1)}
    write_tensors(run.proposal_tensors(method), tensors)
    write_json(run.proposal_records(method),
               [{"prompt_id": p.prompt_id, "family": p.family, "position": p.position,
                 "prompt_text": p.prompt_text, "status": p.status, "meta": dict(p.meta),
                 "has_delta": p.delta is not None, "fixed_alpha": p.fixed_alpha} for p in proposals])


def load_proposals(run: RunDir, method: str) -> list[Proposal]:
    tensors = read_tensors(run.proposal_tensors(method))
    out = []
    for r in read_json(run.proposal_records(method)):
        delta = tensors[f"{r['prompt_id']}|{r['family']}"] if r["has_delta"] else None
        out.append(Proposal(prompt_id=r["prompt_id"], family=r["family"], delta=delta, position=r["position"],
                            prompt_text=r["prompt_text"], status=r["status"], meta=r["meta"],
                            fixed_alpha=r.get("fixed_alpha")))
    return out
