"""The activation reconstructor (AR): explanation text -> vector.

Recipe: the sidecar's AR template (``Summary of the following text: <text>{explanation}</text>
<summary>``), NO chat template, tokenized WITH special tokens (one BOS first); the base LM
truncated to blocks 0..K with its final norm replaced by identity; the hidden state at the LAST
token goes through ``value_head`` (a bias-free ``Linear(d, d)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file

from steercmp.api import ConfigError, LoadedModel, text_config

from .checkpoint import check_finite_weights, hidden_size, load_lm, read_meta, resolve_checkpoint
from .meta import VALUE_HEAD_NAME, NlaMeta


def ar_prompt_ids(tokenizer, meta: NlaMeta, text: str) -> list[int]:  # noqa: ANN001
    """The AR prompt ids: raw template with the explanation, BOS first, exactly once."""
    prompt = meta.template.format(explanation=text)
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None:
        if not ids or ids[0] != bos:
            ids = [bos, *ids]
        if len(ids) > 1 and ids[1] == bos:
            raise ConfigError("the AR prompt starts with two BOS tokens",
                              where=meta.field_where("prompt_templates.ar"),
                              fix="do not put <bos> in the AR template")
    return ids


def check_suffix(ids: Sequence[int], meta: NlaMeta) -> None:
    suffix = meta.critic_suffix_ids
    if suffix and tuple(ids[-len(suffix):]) != tuple(suffix):
        raise ConfigError(
            f"the tokenized AR prompt ends with {list(ids[-len(suffix):])}, sidecar pins "
            f"{list(suffix)}", where=meta.field_where("tokens.critic_suffix_ids"),
            fix="use the tokenizer and template shipped with the AR checkpoint")


@attrs.define
class ActivationReconstructor:
    """A loaded AR: truncated backbone (identity final norm) plus value head."""

    lm: LoadedModel
    meta: NlaMeta
    value_head: torch.nn.Linear

    @classmethod
    def load(cls, source: str | Path, *, dtype: str | torch.dtype = "float32",
             device: str = "cpu", progress: bool = True) -> ActivationReconstructor:
        directory = resolve_checkpoint(str(source), "ar", progress=progress)
        meta = read_meta(directory, "ar")
        head_path = directory / VALUE_HEAD_NAME
        if not head_path.exists():
            raise ConfigError(f"no {VALUE_HEAD_NAME} in {str(directory)!r}", where="ar",
                              fix="an AR checkpoint ships its value head next to the backbone")
        lm = load_lm(directory, dtype=dtype, device=device)
        check_finite_weights(lm.model, "AR backbone", str(directory))
        head_state = load_file(str(head_path))
        for name, tensor in head_state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ConfigError(f"value head tensor {name!r} contains NaN or Inf", where=str(head_path),
                                  fix="the value head is corrupted: re-download or re-export it")
        return cls.from_loaded(lm, meta, head_state)

    @classmethod
    def from_loaded(cls, lm: LoadedModel, meta: NlaMeta,
                    head_state: dict[str, torch.Tensor]) -> ActivationReconstructor:
        d = hidden_size(lm.model)
        if d != meta.d_model:
            raise ConfigError(f"sidecar d_model {meta.d_model} != AR hidden size {d}",
                              where=meta.field_where("d_model"),
                              fix="the sidecar does not belong to these weights")
        n_layers = int(text_config(lm.model.config).num_hidden_layers)
        k = meta.ar_num_hidden_layers if meta.ar_num_hidden_layers is not None else meta.extraction_layer
        if k is None:
            raise ConfigError("the AR sidecar names no extraction layer",
                              where=meta.field_where("ar.num_hidden_layers"),
                              fix="add ar.num_hidden_layers (K) or extraction_layer_index")
        if n_layers != k + 1:
            raise ConfigError(f"config.json has num_hidden_layers={n_layers}, expected K+1={k + 1}",
                              where=meta.field_where("ar.num_hidden_layers"),
                              fix="the AR backbone is truncated to blocks 0..K")
        if set(head_state) != {"weight"} or tuple(head_state["weight"].shape) != (d, d):
            shapes = {k2: tuple(v.shape) for k2, v in head_state.items()}
            raise ConfigError(f"value_head.safetensors holds {shapes}, expected weight [{d}, {d}]",
                              where="ar: value_head.safetensors", fix="re-export the value head")
        decoder = lm.model.get_decoder()
        if len(decoder.layers) != k + 1:
            raise ConfigError(f"AR backbone has {len(decoder.layers)} blocks, expected {k + 1}",
                              where=meta.field_where("ar.num_hidden_layers"),
                              fix="re-export the truncated backbone")
        decoder.norm = torch.nn.Identity()  # the read-out is the raw residual after block K
        head = torch.nn.Linear(d, d, bias=False)
        with torch.no_grad():
            head.weight.copy_(head_state["weight"].float())
        head.to(lm.input_device).requires_grad_(False)
        suffix_probe = ar_prompt_ids(lm.tokenizer, meta, "x")
        check_suffix(suffix_probe, meta)
        return cls(lm=lm, meta=meta, value_head=head)

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    def prompt_ids(self, text: str) -> list[int]:
        ids = ar_prompt_ids(self.lm.tokenizer, self.meta, text)
        check_suffix(ids, self.meta)
        return ids

    @torch.no_grad()
    def features(self, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """Last-token residual after block K (before the value head), fp32 ``[n, d]``."""
        decoder = self.lm.model.get_decoder()
        pad = self.lm.tokenizer.pad_token_id
        pad = 0 if pad is None else pad
        rows: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            chunk = [self.prompt_ids(t) for t in texts[start:start + batch_size]]
            lengths = torch.tensor([len(c) for c in chunk])
            width = int(lengths.max())
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, c in enumerate(chunk):  # right padding: causal rows never see their pads
                ids[i, :len(c)] = torch.tensor(c)
                mask[i, :len(c)] = 1
            dev = self.lm.input_device
            hidden = decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            rows.append(hidden[torch.arange(len(chunk)), (lengths - 1).to(dev)].float().cpu())
        if not rows:
            return torch.zeros((0, self.d_model))
        return torch.cat(rows)

    def reconstruct(self, texts: Sequence[str], *, batch_size: int = 16) -> torch.Tensor:
        """``value_head(last-token residual)`` per text, fp32 ``[n, d]`` on CPU."""
        feats = self.features(texts, batch_size=batch_size)
        with torch.no_grad():
            head = self.value_head.to("cpu")
            return head(feats)

    def unload(self) -> None:
        self.lm.unload()
