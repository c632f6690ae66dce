"""The one score: rhyme-family log-prob mass at the scoring position, and the forms it reads.

For each family word, its surface forms (with/without the leading-space marker, lower and
capitalised; see :func:`steercmp.lm.prompts.word_forms`) are tokenized. A single-token form uses
the next-token log-prob; a multi-token form uses the chained sequence log-prob
``sum_j log p(t_j | context, t_<j)``. A family's mass is the log-sum-exp over its distinct
forms; the primary score is ``logmass(edited) - logmass(original)``.

Multi-token forms are scored by appending "branches" (a form's tokens but the last) to the
context; every branch shares the context, so positions up to the scoring slot are identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import torch

from steercmp.errors import NumericalError
from steercmp.lm.prompts import encode_form, word_forms

FAMILY_NAMES = ("original", "edited", "unrelated")


@attrs.frozen
class FamilyForms:
    """Token sequences per family and the branches that score them.

    ``branches[0]`` is ``()`` (plain next-token). ``entries[family]`` lists, per form, the
    ``(branch, step, token)`` triples whose log-probs sum to the form's log-prob.
    """

    forms: Mapping[str, tuple[tuple[int, ...], ...]]
    branches: tuple[tuple[int, ...], ...]
    entries: Mapping[str, tuple[tuple[tuple[int, int, int], ...], ...]]

    @property
    def max_branch(self) -> int:
        return max(len(b) for b in self.branches)


def family_forms(tokenizer, families: Mapping[str, Sequence[str]]) -> FamilyForms:
    """Tokenize every family's word forms once and lay out the branches to score them."""
    forms: dict[str, tuple[tuple[int, ...], ...]] = {}
    for fam, words in families.items():
        seqs = [encode_form(tokenizer, f) for w in words for f in word_forms(w)]
        forms[fam] = tuple(dict.fromkeys(s for s in seqs if s))
    prefixes = {s[:-1] for seqs in forms.values() for s in seqs if len(s) > 1}
    # keep only maximal branches: a longer branch also yields every prefix's logits
    maximal = sorted(p for p in prefixes if not any(q != p and q[: len(p)] == p for q in prefixes))
    branches: tuple[tuple[int, ...], ...] = ((),) + tuple(maximal)
    entries: dict[str, tuple[tuple[tuple[int, int, int], ...], ...]] = {}
    for fam, seqs in forms.items():
        fam_entries = []
        for s in seqs:
            b = 0 if len(s) == 1 else next(i for i, br in enumerate(branches) if br[: len(s) - 1] == s[:-1])
            fam_entries.append(tuple((b, j, tok) for j, tok in enumerate(s)))
        entries[fam] = tuple(fam_entries)
    return FamilyForms(forms=forms, branches=branches, entries=entries)


def branch_sequences(context: Sequence[int], forms: FamilyForms) -> list[list[int]]:
    """The context followed by each branch (the scoring slot is the context's last token)."""
    return [list(context) + list(b) for b in forms.branches]


def family_logmass(logprobs: torch.Tensor, forms: FamilyForms) -> dict[str, torch.Tensor]:
    """Family log-masses from gathered log-probs.

    ``logprobs [R, n_branches, J, V]`` holds log-softmax at the scoring slot (step 0) and after
    each appended branch token (steps 1..J-1). Returns ``{family: [R]}``.
    """
    if not torch.isfinite(logprobs).all():
        raise NumericalError("logits contain NaN or inf", fix="check the delta scale or the model dtype")
    out: dict[str, torch.Tensor] = {}
    for fam, fam_entries in forms.entries.items():
        per_form = []
        for entry in fam_entries:
            lp = sum(logprobs[:, b, j, tok] for b, j, tok in entry)
            per_form.append(lp)
        out[fam] = torch.logsumexp(torch.stack(per_form, dim=-1), dim=-1)
    return out


def logmass_from_logits(logits: torch.Tensor, forms: FamilyForms) -> dict[str, torch.Tensor]:
    """``logits [R * n_branches, J, V]`` (rows major, branches minor) -> ``{family: [R]}``."""
    nb = len(forms.branches)
    if logits.shape[0] % nb:
        raise ValueError("logit rows are not a multiple of the branch count")
    if not torch.isfinite(logits).all():
        raise NumericalError("logits contain NaN or inf", fix="lower alpha or use float32")
    lp = torch.log_softmax(logits.float(), dim=-1)
    lp = lp.reshape(logits.shape[0] // nb, nb, logits.shape[1], logits.shape[2])
    return family_logmass(lp, forms)
