"""The mini pair's one read pass gives the same gold vectors as the capture path and the same
predicted words as a plain forward (it replaced two separate passes)."""

from __future__ import annotations

import torch

from steercmp.lm.capture import capture_residuals
from steercmp.lm.prompts import tokenize_text
from steercmp.testing import COUPLET_BATTERY
from steercmp_plugins.nla.mini.data import read_items, word_token_ids


def test_read_items_matches_capture_and_a_plain_forward(tiny_lm):
    full = [p["text"] for p in COUPLET_BATTERY["prompts"]]
    texts = full + [t.rsplit(" ", 1)[0] for t in full]  # two lengths; each group split in batches
    items = [{"text": t, "line_end": "stream"} for t in texts]
    gold = read_items(tiny_lm, items, "last", layer=2, k=2, batch=2)
    seqs = [tokenize_text(tiny_lm.tokenizer, t)[0] for t in texts]
    assert len({len(s) for s in seqs}) > 1  # several length groups
    resid = capture_residuals(tiny_lm, 2, seqs, batch_size=4)
    want = torch.stack([r[-1] for r in resid])
    torch.testing.assert_close(gold, want, rtol=1e-4, atol=1e-4)
    words = word_token_ids(tiny_lm.tokenizer)
    ids_of = torch.tensor(sorted(words))
    for it, seq in zip(items, seqs, strict=True):
        logits = tiny_lm.model(input_ids=torch.tensor([list(seq)])).logits[0, -1]
        top = logits[ids_of].topk(2).indices
        assert it["predicted"] == [words[int(ids_of[j])] for j in top]
        assert it["explanation"].startswith("The line ends with stream, rhyme -")
        assert " or ".join(it["predicted"][-2:]) in it["explanation"]
