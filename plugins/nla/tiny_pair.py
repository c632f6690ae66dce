"""Tiny random NLA checkpoints in the released layout, for tests (no hub, milliseconds).

:func:`write_pair` writes an AV and an AR directory exactly as the released pairs are laid out
(config, safetensors, tokenizer with a chat template, ``nla_meta.yaml``, ``value_head``), so a
test drives the same loader and recipe code path as the 12B pair.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

INJ = "\u321c"  # the 12B release's injection character
AV_TEMPLATE = "Explain the concept <concept> {injection_char} </concept> in plain words ."
AR_TEMPLATE = "Summary of the following text : <text> {explanation} </text> <summary>"
CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
WORDS = ("the line ends with stream dream seem gleam beam stone bone next should rhyme planning "
         "or and a an of to in summary following text explain concept plain words user model "
         "light night kite bird word herd").split()
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PUNCT = [".", ",", ":", ";", "<", ">", "</", "-", '"', "<explanation>", "</explanation>",
         "<concept>", "</concept>", "<text>", "</text>", "<summary>"]


def make_tokenizer(add_bos: bool = True, chat_template: str | None = CHAT) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + PUNCT + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.add_tokens([AddedToken(INJ, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_config(vocab_size: int, layers: int, hidden: int = 64) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        max_position_embeddings=256, sliding_window=64, pad_token_id=0, eos_token_id=[1, 5],
        bos_token_id=2, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
    )


def write_pair(root: Path, *, layer: int = 2, hidden: int = 64, seed: int = 0,
               injection_scale: float = 50.0, av_meta_overrides: dict | None = None,
               ar_meta_overrides: dict | None = None, add_bos: bool = True) -> tuple[Path, Path]:
    """Write ``root/av`` and ``root/ar`` in the released layout; return both directories."""
    torch.manual_seed(seed)
    tok = make_tokenizer(add_bos=add_bos)
    vocab_size = len(tok)
    av_dir, ar_dir = root / "av", root / "ar"
    av = Gemma3ForCausalLM(tiny_config(vocab_size, layers=3, hidden=hidden)).eval()
    av.save_pretrained(av_dir)
    tok.save_pretrained(av_dir)
    ar = Gemma3ForCausalLM(tiny_config(vocab_size, layers=layer + 1, hidden=hidden)).eval()
    ar.save_pretrained(ar_dir)
    tok.save_pretrained(ar_dir)
    save_file({"weight": torch.randn(hidden, hidden) / hidden ** 0.5},
              str(ar_dir / "value_head.safetensors"))

    content = AV_TEMPLATE.format(injection_char=INJ)
    ids = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                  add_generation_prompt=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    inj_id = tok.convert_tokens_to_ids(INJ)
    pos = ids.index(inj_id)
    av_meta = {
        "kind": "nla_model", "role": "av", "d_model": hidden, "extraction_layer_index": layer,
        "extraction": {"injection_scale": injection_scale, "mse_scale": "sqrt_d_model"},
        "tokens": {"injection_char": INJ, "injection_token_id": inj_id,
                   "injection_left_neighbor_id": ids[pos - 1],
                   "injection_right_neighbor_id": ids[pos + 1]},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
    }
    ar_ids = tok(AR_TEMPLATE.format(explanation="x"))["input_ids"]
    ar_meta = {
        "kind": "nla_model", "role": "ar", "d_model": hidden, "extraction_layer_index": layer,
        "ar": {"num_hidden_layers": layer},
        "extraction": {"injection_scale": None, "mse_scale": hidden ** 0.5},
        "tokens": {"critic_suffix_ids": ar_ids[-2:]},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
    }
    for meta, over in ((av_meta, av_meta_overrides), (ar_meta, ar_meta_overrides)):
        for key, value in (over or {}).items():
            target = meta
            *parents, last = key.split(".")
            for p in parents:
                target = target.setdefault(p, {})
            if value is DELETE:
                target.pop(last, None)
            else:
                target[last] = value
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(av_meta, allow_unicode=True))
    (ar_dir / "nla_meta.yaml").write_text(yaml.safe_dump(ar_meta, allow_unicode=True))
    return av_dir, ar_dir


class _Delete:
    """Marker: an override value that removes the key from the sidecar."""


DELETE = _Delete()
