"""The activation verbalizer (AV): vector -> explanation text.

Recipe (see the NLA inference contract): the sidecar's AV template, formatted with the injection
character, goes through the tokenizer's chat template as ONE user message with the generation
prompt, tokenized in one step (the template already holds ``<bos>``). The ids are embedded with the
model's own input-embedding module (Gemma's module already multiplies by sqrt(hidden)); the one
row at the injection site is overwritten with ``v / ||v||_fp32 * injection_scale``; generation then
runs from ``inputs_embeds`` and stops on ``<eos>`` / ``<end_of_turn>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

from steercmp.api import (
    ConfigError,
    LoadedModel,
    NumericalError,
    cache_kwargs,
    output_cache,
    sample_tokens,
)

from .checkpoint import (
    as_id_list,
    check_finite_weights,
    hidden_size,
    load_lm,
    read_meta,
    resolve_checkpoint,
)
from .meta import NlaMeta

EXPLANATION_RE = re.compile(r"<explanation>\s*(.*?)\s*</explanation>", re.DOTALL)
STOP_TOKENS = ("<end_of_turn>", "<eos>")


def parse_explanation(raw: str) -> tuple[str, bool]:
    """``(explanation, complete)``: the tagged payload, or the raw text (minus an opening tag)
    when the close tag is missing (a truncated generation)."""
    match = EXPLANATION_RE.search(raw)
    if match:
        return match.group(1), True
    text = raw.split("<explanation>", 1)[-1]
    return text.strip(), False


def av_prompt_ids(tokenizer, meta: NlaMeta) -> list[int]:  # noqa: ANN001 - any HF tokenizer
    """The AV prompt: one user message through the chat template, tokenized in one step."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the AV tokenizer has no chat template", where=meta.field_where("tokens"),
                          fix="ship tokenizer_config.json / chat_template.jinja with the checkpoint")
    content = meta.template.format(injection_char=meta.injection_char)
    ids = as_id_list(tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True))
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        raise ConfigError("the AV prompt starts with two BOS tokens (every position would shift)",
                          where=meta.field_where("prompt_templates"),
                          fix="tokenize the chat-templated prompt in one step without adding "
                              "special tokens again")
    return ids


def find_injection_site(ids: Sequence[int], meta: NlaMeta) -> int:
    """The one position holding the injection token between the pinned neighbour ids."""
    candidates = [i for i, t in enumerate(ids) if t == meta.injection_token_id]
    sites = [i for i in candidates if 0 < i < len(ids) - 1
             and ids[i - 1] == meta.left_neighbor_id and ids[i + 1] == meta.right_neighbor_id]
    if len(sites) != 1:
        detail = ", ".join(f"{i}: ({ids[i - 1] if i > 0 else None}, "
                           f"{ids[i + 1] if i + 1 < len(ids) else None})" for i in candidates)
        raise ConfigError(
            f"expected exactly one injection site (token {meta.injection_token_id} between "
            f"{meta.left_neighbor_id} and {meta.right_neighbor_id}), found {len(sites)}; "
            f"token occurrences with neighbours: [{detail}]",
            where=meta.field_where("tokens.injection_left_neighbor_id"),
            fix="the tokenizer or chat template drifted from the one the AV was trained with")
    return sites[0]


def scale_vector(vector: torch.Tensor, scale: float) -> torch.Tensor:
    """``v / ||v|| * scale`` with the norm computed in fp32; returns fp32 ``[..., d]``."""
    v = vector.float()
    norm = v.norm(dim=-1, keepdim=True)
    if not torch.isfinite(v).all() or bool((norm == 0).any()):
        raise NumericalError("cannot inject a zero or non-finite vector",
                             fix="check the activation you pass to the AV")
    return v / norm * scale


def _stop_ids(tokenizer, model) -> tuple[int, ...]:  # noqa: ANN001
    ids: set[int] = set()
    unk = tokenizer.unk_token_id
    for tok in STOP_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != unk and tid >= 0:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif isinstance(gen_eos, list):
        ids.update(int(x) for x in gen_eos)
    return tuple(sorted(ids))


@attrs.define
class ActivationVerbalizer:
    """A loaded AV with its validated sidecar, prompt ids and injection site."""

    lm: LoadedModel
    meta: NlaMeta
    prompt_ids: tuple[int, ...]
    site: int
    stop_ids: tuple[int, ...]

    @classmethod
    def load(cls, source: str | Path, *, dtype: str | torch.dtype = "float32",
             device: str = "cpu", progress: bool = True) -> ActivationVerbalizer:
        directory = resolve_checkpoint(str(source), "av", progress=progress)
        meta = read_meta(directory, "av")
        lm = load_lm(directory, dtype=dtype, device=device)
        check_finite_weights(lm.model, "AV", str(directory))
        return cls.from_loaded(lm, meta)

    @classmethod
    def from_loaded(cls, lm: LoadedModel, meta: NlaMeta) -> ActivationVerbalizer:
        """Assert the sidecar against the live tokenizer and model, then wrap them."""
        tok = lm.tokenizer
        if hidden_size(lm.model) != meta.d_model:
            raise ConfigError(f"sidecar d_model {meta.d_model} != AV hidden size "
                              f"{hidden_size(lm.model)}", where=meta.field_where("d_model"),
                              fix="the sidecar does not belong to these weights")
        char_ids = tok.encode(meta.injection_char, add_special_tokens=False)
        if char_ids != [meta.injection_token_id]:
            raise ConfigError(
                f"injection char {meta.injection_char!r} tokenizes to {char_ids}, sidecar says "
                f"[{meta.injection_token_id}]", where=meta.field_where("tokens.injection_token_id"),
                fix="use the tokenizer shipped with the checkpoint")
        ids = av_prompt_ids(tok, meta)
        site = find_injection_site(ids, meta)
        return cls(lm=lm, meta=meta, prompt_ids=tuple(ids), site=site,
                   stop_ids=_stop_ids(tok, lm.model))

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    def inputs_embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, d]`` prompt embeddings with each row's vector at the injection site."""
        if vectors.ndim == 1:
            vectors = vectors[None]
        if vectors.shape[-1] != self.d_model:
            raise ConfigError(f"vector has {vectors.shape[-1]} dims, the AV expects "
                              f"{self.d_model}", where="vector", fix="pass a [d_model] vector")
        embed = self.lm.model.get_input_embeddings()
        ids = torch.tensor([self.prompt_ids], device=self.lm.input_device)
        with torch.no_grad():
            base = embed(ids)  # Gemma's module applies its own sqrt(hidden) scale
        out = base.expand(vectors.shape[0], -1, -1).clone()
        scaled = scale_vector(vectors.to(out.device), float(self.meta.injection_scale))
        out[:, self.site, :] = scaled.to(out.dtype)
        return out

    @torch.no_grad()
    def generate_raw(self, vectors: torch.Tensor, *, generators: Sequence[torch.Generator] | None,
                     temperature: float = 1.0, greedy: bool = False,
                     max_new_tokens: int = 200) -> list[str]:
        """One generation per row of ``vectors``; row ``i`` samples with ``generators[i]``.

        Every row shares the prompt, so the batch needs no padding; finished rows keep decoding
        but their tokens after the stop token are discarded.
        """
        model = self.lm.model
        embeds = self.inputs_embeds(vectors)
        n = embeds.shape[0]
        if not greedy and (generators is None or len(generators) != n):
            raise ValueError("sampling needs one generator per row")
        if not greedy and temperature <= 0:
            raise ValueError("temperature must be > 0 (or use greedy)")
        out = model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        past = output_cache(out)
        logits = out.logits[:, -1, :].cpu()  # the sampler upcasts row chunks
        produced: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        stop = set(self.stop_ids)
        for _ in range(max_new_tokens):
            nxt = (logits.argmax(dim=-1) if greedy else sample_tokens(logits, generators, temperature)).cpu()
            for i in range(n):
                if not done[i]:
                    t = int(nxt[i])
                    if t in stop:
                        done[i] = True
                    else:
                        produced[i].append(t)
            if all(done):
                break
            out = model(input_ids=nxt[:, None].to(embeds.device), **cache_kwargs(model, past),
                        use_cache=True, logits_to_keep=1)
            past = output_cache(out)
            logits = out.logits[:, -1, :].cpu()  # the sampler upcasts row chunks
        return [self.lm.tokenizer.decode(p, skip_special_tokens=True) for p in produced]

    def explain(self, vectors: torch.Tensor, **kwargs) -> list[tuple[str, str, bool]]:
        """``[(explanation, raw, complete)]`` per row of ``vectors``."""
        raws = self.generate_raw(vectors, **kwargs)
        return [(*parse_explanation(r)[:1], r, parse_explanation(r)[1]) for r in raws]

    def unload(self) -> None:
        self.lm.unload()
