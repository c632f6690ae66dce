"""Training text for the embedded SAE: generated, deterministic, offline.

No corpus can be downloaded, so steercmp generates one: template couplets from
:func:`steercmp.rhymes.make_couplets` (completed with their plan word, so the model sees the
line break where a rhyme plan forms and the rhyme that follows) interleaved with plain prose from
:func:`steercmp.rhymes.general_sentences`. Documents are a few stanzas or a short paragraph; the
tokenised stream is packed into fixed-length contexts that each start with BOS (no padding).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch

from steercmp.api import general_sentences, make_couplets

__all__ = ["corpus_documents", "corpus_fingerprint", "pack_tokens"]


def corpus_documents(n_couplets: int, n_sentences: int, seed: int) -> list[str]:
    """Documents mixing couplet stanzas (2-4 per document) and prose paragraphs (3-6 sentences).

    A pure function of its arguments: the same call gives the same list on every machine.
    """
    rng = random.Random(f"sae-corpus:{seed}")
    stanzas = [f"{c.text} {c.plan}." for c in make_couplets(n_couplets, seed)]
    sentences = general_sentences(n_sentences, seed)
    docs: list[str] = []
    i = 0
    while i < len(stanzas):
        k = rng.randint(2, 4)
        docs.append("\n\n".join(stanzas[i : i + k]))
        i += k
    i = 0
    while i < len(sentences):
        k = rng.randint(3, 6)
        docs.append(" ".join(sentences[i : i + k]))
        i += k
    rng.shuffle(docs)
    return docs


def corpus_fingerprint(docs: Sequence[str]) -> str:
    """A short sha256 of the documents (stored with the SAE so a changed generator retrains)."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def pack_tokens(docs: Sequence[str], tokenizer, context: int, bos_id: int) -> torch.Tensor:  # noqa: ANN001
    """Tokenise ``docs`` without special tokens, join them with a blank line, and cut the stream into
    rows of ``context`` tokens, each ``[BOS] + context-1 tokens``: shape ``[n_rows, context]``."""
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.extend(sep)
    body = context - 1
    n_rows = len(stream) // body
    if n_rows == 0:
        raise ValueError("corpus shorter than one context")
    rows = torch.tensor(stream[: n_rows * body], dtype=torch.long).view(n_rows, body)
    return torch.cat([torch.full((n_rows, 1), bos_id, dtype=torch.long), rows], dim=1)
