"""The only place steercmp touches a model's modules: capture, edit and skip decoder blocks.

Every method, control, scorer and sampler injects through :func:`injecting`, so a comparison
is fair by construction; captures go through :func:`capturing` / :func:`layer_outputs`; the
sweep's partial forward swaps blocks with :func:`skipping_blocks`. Each context manager removes
what it attached on every exit path. A batch carries one delta, alpha, position and scaling
PER ROW.

Scalings (recorded in every result):
- ``raw``: ``h <- h + alpha * delta`` (the research note's convention);
- ``norm_relative``: ``h <- h + alpha * ||h|| * delta / ||delta||`` (the NLA paper's), with
  ``||h||`` the norm of that row's residual at the injected position.

Positions index the (possibly padded) input tensor. With ``once=True`` (generation with a KV
cache) the delta is applied in the prefill call only; later decode steps pass untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import torch

from steercmp.errors import NumericalError
from steercmp.lm.compat import cache_kwargs
from steercmp.lm.layout import decoder_layers

SCALING_CODES = {"raw": 0, "norm_relative": 1}


@attrs.frozen(eq=False)
class Injection:
    """Per-row injection spec: ``deltas [B, d]``, ``alphas [B]``, ``positions [B]``, ``norm_relative [B]``."""

    deltas: torch.Tensor
    alphas: torch.Tensor
    positions: torch.Tensor
    norm_relative: torch.Tensor

    @classmethod
    def build(
        cls,
        deltas: torch.Tensor | Sequence[torch.Tensor],
        alphas: Sequence[float] | torch.Tensor,
        positions: Sequence[int] | torch.Tensor,
        scalings: Sequence[str] | str = "raw",
    ) -> Injection:
        d = torch.stack(list(deltas)) if not isinstance(deltas, torch.Tensor) else deltas
        d = d.detach().to(torch.float32)
        n = d.shape[0]
        if isinstance(scalings, str):
            scalings = [scalings] * n
        a = torch.as_tensor(alphas, dtype=torch.float32).reshape(-1)
        p = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if not (a.shape[0] == p.shape[0] == len(scalings) == n):
            raise ValueError("deltas, alphas, positions and scalings need one entry per row")
        nr = torch.tensor([SCALING_CODES[s] for s in scalings], dtype=torch.bool)
        if not torch.isfinite(d).all():
            bad = int((~torch.isfinite(d)).any(dim=-1).nonzero()[0])
            raise NumericalError(f"delta of batch row {bad} contains NaN or inf",
                                 fix="check the method that proposed it")
        if not torch.isfinite(a).all():
            raise NumericalError("an alpha is NaN or inf", fix="use finite alphas")
        return cls(deltas=d, alphas=a, positions=p, norm_relative=nr)

    @classmethod
    def none(cls, batch: int, d_model: int) -> Injection:
        """A do-nothing injection (zero deltas) for the unsteered reference."""
        return cls.build(torch.zeros(batch, d_model), [0.0] * batch, [0] * batch, "raw")

    def __len__(self) -> int:
        return int(self.deltas.shape[0])

    def repeat_interleave(self, k: int) -> Injection:
        """Repeat each row ``k`` times (one row per scoring branch or sampling seed)."""
        return Injection(self.deltas.repeat_interleave(k, 0), self.alphas.repeat_interleave(k),
                         self.positions.repeat_interleave(k), self.norm_relative.repeat_interleave(k))

    def shifted(self, shift: torch.Tensor | int) -> Injection:
        """Positions moved by ``shift`` (e.g. left-padding offsets, or a KV-cached prefix)."""
        return attrs.evolve(self, positions=self.positions + shift)

    def select(self, index: torch.Tensor | Sequence[int]) -> Injection:
        idx = torch.as_tensor(index, dtype=torch.long)
        return Injection(self.deltas[idx], self.alphas[idx], self.positions[idx], self.norm_relative[idx])


def apply_injection(hidden: torch.Tensor, inj: Injection, offset: int = 0) -> torch.Tensor:
    """Return ``hidden [B, S, d]`` with each row's delta added at ``position - offset``.

    Rows whose position falls outside ``[offset, offset + S)`` are left unchanged. Pure function:
    the hook and the sweep's partial forward both call it, so there is one formula.
    """
    batch, seq, _ = hidden.shape
    if len(inj) != batch:
        raise ValueError(f"injection has {len(inj)} rows but the batch has {batch}")
    local = inj.positions.to(hidden.device) - offset
    active = (local >= 0) & (local < seq)
    if not bool(active.any()):
        return hidden
    rows = torch.nonzero(active).squeeze(-1)
    pos = local[rows]
    h = hidden[rows, pos].to(torch.float32)
    out = hidden.clone()
    out[rows, pos] = (h + _added(h, inj, rows)).to(hidden.dtype)
    return out


def _added(h: torch.Tensor, inj: Injection, rows: torch.Tensor) -> torch.Tensor:
    """The float32 vector each of ``rows`` adds to its residual ``h`` (raw or norm-relative)."""
    delta = inj.deltas.to(h.device)[rows]
    alpha = inj.alphas.to(h.device)[rows].unsqueeze(-1)
    nr = inj.norm_relative.to(h.device)[rows].unsqueeze(-1)
    dnorm = delta.norm(dim=-1, keepdim=True)
    unit = torch.where(dnorm > 0, delta / dnorm.clamp_min(1e-30), torch.zeros_like(delta))
    return torch.where(nr, alpha * h.norm(dim=-1, keepdim=True) * unit, alpha * delta)


def delta_survival(hidden: torch.Tensor, inj: Injection, offset: int = 0) -> torch.Tensor:
    """Per row, the share of the injected delta that survives the cast back to ``hidden``'s dtype:
    ``||cast(h + add) - h|| / ||add||`` at the row's position (1 for rows that inject nothing or
    lie outside ``hidden``). At the 12B's residual norms (~74k at layer 32) a bf16 cast rounds away
    the parts of a delta below the format's spacing; this says how much."""
    out = torch.ones(len(inj), dtype=torch.float64)
    local = inj.positions.to(hidden.device) - offset
    active = (local >= 0) & (local < hidden.shape[1])
    if not bool(active.any()):
        return out
    rows = torch.nonzero(active).squeeze(-1)
    h = hidden[rows, local[rows]].to(torch.float32)
    add = _added(h, inj, rows)
    want = add.norm(dim=-1)
    got = ((h + add).to(hidden.dtype).to(torch.float32) - h).norm(dim=-1)
    out[rows.cpu()] = torch.where(want > 0, got / want.clamp_min(1e-30), torch.ones_like(want)).double().cpu()
    return out


def _output_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _check_layer(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer} out of range: the model has {len(layers)} blocks (0..{len(layers) - 1})")
    return layers[layer]


@contextmanager
def injecting(model: torch.nn.Module, layer: int, inj: Injection, *, once: bool = False,
              offset: int = 0) -> Iterator[None]:
    """Add each row's delta at the output of block ``layer`` during the forward passes inside.

    ``once=True``: apply in the first call only (generation: the prefill), and require every
    position to fall inside it. The hook is removed on every exit path, exceptions included.
    """
    block = _check_layer(model, layer)
    state = {"calls": 0}

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        state["calls"] += 1
        if once and state["calls"] > 1:
            return output
        hidden = _output_tensor(output)
        if once and int(inj.positions.max()) - offset >= hidden.shape[1]:
            raise ValueError("an injection position lies beyond the prefill")
        return _replace_output(output, apply_injection(hidden, inj, offset))

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capturing(model: torch.nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Record the output of block ``layer`` (= ``hidden_states[layer+1]``) for each forward call."""
    block = _check_layer(model, layer)
    store: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        store.append(_output_tensor(output).detach())

    handle = block.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def capturing_layers(model: torch.nn.Module, layers: Sequence[int]) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record the output of every block in ``layers`` for each forward call (one pass, many layers)."""
    stores: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = []
    try:
        for layer in layers:
            def hook(_module: torch.nn.Module, _args: Any, output: Any, store: list = stores[layer]) -> None:
                store.append(_output_tensor(output).detach())

            handles.append(_check_layer(model, layer).register_forward_hook(hook))
        yield stores
    finally:
        for handle in handles:
            handle.remove()


def attached_hooks(model: torch.nn.Module) -> int:
    """Count forward hooks left on any submodule (hook hygiene checks)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _contiguous_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    # .contiguous() keeps the strides of size-1 dims (a [1, 1, d] slice stays strided);
    # a view with fresh strides lets matmul fold the batch into one mm
    return (x.contiguous().view(x.shape), *args[1:])


def contiguous_readout(model: torch.nn.Module) -> None:
    """Give the output layer a contiguous input, for the model's lifetime.

    With ``logits_to_keep`` the model feeds the readout a strided slice of its hidden states;
    ``matmul`` then cannot fold the batch and broadcasts the [vocab, d] weight per row. On CPU
    in bfloat16 that copies the 262k-row weight for every row (measured: 6.8 s instead of
    0.11 s for 8 rows of Gemma 3 270M; float32 also gains, 0.39 s -> 0.29 s)."""
    readout = model.get_output_embeddings()
    if readout is not None and _contiguous_input not in readout._forward_pre_hooks.values():
        readout.register_forward_pre_hook(_contiguous_input)


class _NoReadout(torch.nn.Module):
    """Stands in for the output layer: keeps the hidden states it was given (after the final norm)
    and returns them (d wide) instead of a vocabulary-wide projection."""

    def __init__(self, store: list[torch.Tensor]):
        super().__init__()
        self.store = store

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.store.append(hidden_states)
        return hidden_states


@contextmanager
def readout_skipped(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Run the model's own forward without its vocabulary projection; yields a list that receives
    the hidden states the projection would have read (one entry per forward, after the final
    norm, at the kept positions). For passes whose logits are thrown away (a prefix that only
    fills a KV cache) or projected later in chunks (:func:`steercmp.lm.readout.project_to_vocab`).
    On CPU the 262k-row projection of Gemma 3 costs a full read of its weights per call (~22 ms
    even for one row of the 270M in bf16). The pass's ``logits`` are not logits: never read them."""
    store: list[torch.Tensor] = []
    readout = model.get_output_embeddings()
    if readout is None:
        raise ValueError(f"{type(model).__name__} has no output layer to skip")
    model.set_output_embeddings(_NoReadout(store))
    try:
        yield store
    finally:
        model.set_output_embeddings(readout)


class _StopForward(Exception):
    """Raised by :func:`layer_outputs`' hook to skip every block after the captured one."""


def layer_outputs(model: torch.nn.Module, layer: int, input_ids: torch.Tensor | None = None, cache: Any = None,
                  attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Output of block ``layer`` for ``input_ids`` (or ``inputs_embeds``) without running later
    blocks (with ``cache``, blocks 0..layer also append their keys/values to it). Returns
    ``[batch, seq, d]``."""
    block = _check_layer(model, layer)
    store: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        store.append(_output_tensor(output).detach())
        raise _StopForward

    handle = block.register_forward_hook(hook)
    try:
        inputs = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        model(**inputs, attention_mask=attention_mask, **cache_kwargs(model, cache), use_cache=cache is not None,
              logits_to_keep=1)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return store[0]


class _SkipBlock(torch.nn.Module):
    """Stands in for a block whose output is already known: passes the residual through."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.attention_type = getattr(original, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def skipping_blocks(model: torch.nn.Module, upto: int) -> Iterator[None]:
    """Replace blocks 0..upto with identities for the duration; always restore them."""
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(upto + 1)]
    try:
        for i in range(upto + 1):
            layers[i] = _SkipBlock(saved[i])
        yield
    finally:
        for i, block in enumerate(saved):
            layers[i] = block
