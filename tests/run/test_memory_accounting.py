"""The memory ledger counts the bytes of every resident model, wrappers included (an NLA AV or
AR holds its model under ``.lm``): a wrapper reported as 0 bytes hid the largest model."""

import torch

from steercmp.run.runtime import _object_bytes
from steercmp.testing import tiny_lm
from steercmp_plugins.nla.ar import ActivationReconstructor


def test_wrapped_models_are_counted():
    lm = tiny_lm()
    base = sum(t.numel() * t.element_size() for t in (*lm.model.parameters(), *lm.model.buffers()))
    assert _object_bytes(lm) == base
    head = torch.nn.Linear(64, 64, bias=False)
    ar = ActivationReconstructor(lm=lm, meta=None, value_head=head)
    assert _object_bytes(ar) == base + 64 * 64 * 4
