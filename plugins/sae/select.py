"""Feature-selection rules: which SAE features stand for a rhyme family. Pure tensor functions.

Rule ``unembed`` (a): read each decoder direction out through the model's unembedding and score
how much it promotes the family's tokens. The exact logit effect of adding a direction ``d`` to the
residual at layer K would need every later block; we use the direct-path ("logit lens")
approximation instead: ``logits ≈ W_U · (gamma ⊙ d)``, where ``gamma`` is the final RMSNorm's
gain (Gemma: ``1 + weight``) and the RMS normalisation itself is dropped (it rescales all logits
of one position by the same positive factor, so the ranking of features for a family is
unchanged). A feature's score for a family is the mean logit of the family's tokens minus the mean
logit over the whole vocabulary (softmax ignores a constant shift), for the unit-norm decoder
direction. Only ``gamma ⊙ W_U[rows]`` for the family tokens and the vocabulary-mean row are kept
(:class:`Readout`), so the 262k-row unembedding is dropped before the SAE loads.

Rule ``contrast`` (b): features most active at the planning position on prompts whose rhyme sound
matches the family's, minus their mean activation on prompts whose rhyme does not. The prompt
being scored is always held out. Because ``original`` and ``edited`` share one rhyme sound, this
rule gives them the same features: it moves a prompt toward a rhyme, not toward one plan word.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

__all__ = [
    "Readout",
    "Selection",
    "contrast_scores",
    "family_token_ids",
    "select_contrast",
    "select_unembed",
    "top_features",
    "unembed_scores",
]


@attrs.frozen
class Selection:
    """Chosen features (best first), their scores and the rule that chose them."""

    rule: str
    features: tuple[int, ...]
    scores: tuple[float, ...]
    note: str = ""


@attrs.frozen(eq=False)
class Readout:
    """The small part of the unembedding rule (a) needs.

    ``rows`` ``[n_tokens, d]`` = ``gamma ⊙ W_U[token_ids]``; ``mean_row`` ``[d]`` = the same for the
    vocabulary mean; ``index`` maps a token id to its row.
    """

    rows: torch.Tensor
    mean_row: torch.Tensor
    index: dict[int, int]

    @classmethod
    def build(cls, unembed: torch.Tensor, token_ids: Sequence[int],
              gamma: torch.Tensor | None = None) -> Readout:
        """From an unembedding ``[vocab, d]`` (``lm_head.weight``), the token ids any family uses and
        the final-norm gain ``gamma`` ``[d]`` (``None`` = no norm)."""
        ids = list(dict.fromkeys(int(t) for t in token_ids))
        with torch.no_grad():
            w = unembed.detach()
            g = (gamma.detach().float().cpu() if gamma is not None
                 else torch.ones(w.shape[1]))
            rows = w[ids].float().cpu() * g
            total = torch.zeros(w.shape[1], dtype=torch.float64)
            for start in range(0, w.shape[0], 16384):  # no full float copy of a 262k x d matrix
                total += w[start : start + 16384].double().sum(0).cpu()
            mean_row = (total / w.shape[0]).float() * g
        return cls(rows=rows, mean_row=mean_row, index={t: i for i, t in enumerate(ids)})


def family_token_ids(tokenizer, words: Sequence[str]) -> list[int]:  # noqa: ANN001 - any HF tokenizer
    """First token of each scored surface form of each word (`` word``, `` Word``, ``word``,
    ``Word``; the forms :func:`steercmp.lm.prompts.word_forms` scores), deduplicated."""
    from steercmp.api import encode_form, word_forms

    out: list[int] = []
    for w in words:
        for form in word_forms(w):
            ids = encode_form(tokenizer, form)
            if ids:
                out.append(int(ids[0]))
    return list(dict.fromkeys(out))


def unembed_scores(W_dec: torch.Tensor, readout: Readout, token_ids: Sequence[int]) -> torch.Tensor:
    """Rule (a) score of every feature for one family: ``[d_sae]``.

    ``mean_t (u_t - u_mean) · d_f / |d_f|`` over the family's tokens ``t``.
    """
    rows = readout.rows[[readout.index[int(t)] for t in token_ids]]  # [n, d]
    target = rows.mean(0) - readout.mean_row  # [d]
    unit = W_dec.detach().float().cpu()
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ target


def contrast_scores(codes: torch.Tensor, rhymes: Sequence[str], family_rhyme: str,
                    hold_out: Sequence[int] = ()) -> tuple[torch.Tensor, int, int]:
    """Rule (b) score of every feature: mean code on matching prompts minus mean on the others.

    ``codes`` ``[n_prompts, d_sae]`` are SAE codes at each prompt's planning position; ``rhymes``
    the prompts' rhyme sounds; rows in ``hold_out`` (the prompt being scored) are never used.
    Returns ``(scores [d_sae], n_matching, n_other)``; scores are zero if either side is empty.
    """
    held = set(int(i) for i in hold_out)
    keep = [i for i in range(len(rhymes)) if i not in held]
    pos = [i for i in keep if rhymes[i] == family_rhyme]
    neg = [i for i in keep if rhymes[i] != family_rhyme]
    if not pos or not neg:
        return torch.zeros(codes.shape[1]), len(pos), len(neg)
    c = codes.float()
    return c[pos].mean(0) - c[neg].mean(0), len(pos), len(neg)


def top_features(scores: torch.Tensor, k: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The ``k`` highest-scoring features with a positive score, best first (ties: lower index)."""
    n = min(int(k), int(scores.shape[0]))
    order = torch.topk(scores.float(), n).indices.tolist() if n > 0 else []
    chosen = [int(i) for i in order if float(scores[i]) > 0][:k]
    return tuple(chosen), tuple(float(scores[i]) for i in chosen)


def select_unembed(W_dec: torch.Tensor, readout: Readout, token_ids: Sequence[int],
                   k: int) -> Selection:
    """Rule (a): the ``k`` decoder directions that most promote the family's tokens."""
    feats, scores = top_features(unembed_scores(W_dec, readout, token_ids), k)
    return Selection("unembed", feats, scores)


def select_contrast(codes: torch.Tensor, rhymes: Sequence[str], family_rhyme: str, k: int,
                    hold_out: Sequence[int] = ()) -> Selection:
    """Rule (b): the ``k`` features most active on matching-rhyme prompts, the scored one held out."""
    scores, n_pos, n_neg = contrast_scores(codes, rhymes, family_rhyme, hold_out)
    feats, vals = top_features(scores, k)
    return Selection("contrast", feats, vals,
                     note=f"{n_pos} matching / {n_neg} other prompts (scored prompt held out)")
