"""Capturing at the last token with shared prefixes: the same residuals as a plain forward."""

import torch

from steercmp.lm.capture import capture_last_tokens, capture_residuals, prefix_groups


def test_prefix_groups_share_long_prefixes_and_leave_every_member_a_token():
    seqs = [(2, 5, 6, 7, 8, 9), (2, 5, 6, 7, 8, 10, 11), (2, 5, 6, 7, 3), (2, 5, 6), (4, 4, 4, 4, 4, 4),
            (2, 5, 6, 7, 8, 9)]
    groups = prefix_groups(seqs, min_prefix=4)
    assert sorted(i for _, members in groups for i in members) == list(range(len(seqs)))
    shared = [(plen, sorted(m)) for plen, m in groups if plen]
    assert shared == [(4, [0, 1, 2, 5])]  # (2, 5, 6) is too short to share 4; (4, ...) shares nothing
    assert sorted(next(m for plen, m in groups if plen == 0)) == [3, 4]
    for plen, members in groups:
        assert all(len(seqs[i]) > plen and seqs[i][:plen] == seqs[members[0]][:plen] for i in members)
    assert prefix_groups([(1, 2, 3, 4, 5)] * 2, min_prefix=4) == [(4, [0, 1])]  # identical: one token each


def test_capture_last_tokens_equals_a_plain_forward(tiny_lm):
    """Templates with swapped words, tails of different lengths, prefixes past the sliding window
    (8 tokens in the tiny model), a sequence that shares nothing: every last-token residual equals
    the plain forward's, in batches smaller than a group."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for template in range(3):
        head = [2, *torch.randint(3, 500, (4 + 5 * template,), generator=g).tolist()]
        tail = torch.randint(3, 500, (3,), generator=g).tolist()
        for word in range(5):
            seqs.append(tuple(head + [10 + word] + tail[: 1 + word % 3]))
    seqs.append((2, 7, 9))
    for layer in (0, 2, 3):
        got = capture_last_tokens(tiny_lm, layer, seqs, batch_size=2)
        want = [r[-1] for r in capture_residuals(tiny_lm, layer, seqs, batch_size=4)]
        assert len(got) == len(seqs) and float(want[0].abs().max()) > 0.1
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)
