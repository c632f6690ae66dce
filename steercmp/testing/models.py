"""Tiny, seeded stand-ins for tests: a Gemma 3 model built from a config (vocabulary 512), a
Gemma-style tokenizer (one token per word, a few words in two), the kit's four-prompt battery, an experiment and contexts.

Nothing here downloads anything; a tiny model forwards in milliseconds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from steercmp.api import SCALINGS, PromptContext
from steercmp.battery import Battery
from steercmp.config import Experiment
from steercmp.lm.capture import extract
from steercmp.lm.load import LoadedModel

#: The kit's battery: four couplets in the shape of the note8 battery, the last one a prompt the
#: positive control must drop (no same-length counterfactual), so a run of the kit meets a drop.
TINY_BATTERY: dict[str, Any] = {
    "version": 1,
    "name": "conformance",
    "defaults": {"inject": "first_line_break", "score": "last"},
    "prompts": [
        {"id": "stream_dream",
         "text": "I wandered slowly down beside the stream,\nAnd closed my eyes to drift into a",
         "families": {"original": ["dream", "seem"], "edited": ["gleam", "beam"],
                      "unrelated": ["stone", "bone"]},
         "edits": {"edited": {"dream": "gleam", "seem": "beam"},
                   "unrelated": {"dream": "stone", "seem": "bone"}}},
        {"id": "hill_still",
         "text": "The evening sun went down behind the hill,\nAnd all the world around us lay so",
         "families": {"original": ["still", "chill"], "edited": ["thrill", "ill"],
                      "unrelated": ["bright", "white"]},
         "edits": {"edited": {"still": "thrill", "chill": "ill"},
                   "unrelated": {"still": "bright", "chill": "white"}}},
        {"id": "fire_desire",
         "text": "We sat together warming by the fire,\nMy heart was burning with a strong",
         "families": {"original": ["desire", "higher"], "edited": ["wire", "tire"],
                      "unrelated": ["love", "glove"]},
         "edits": {"edited": {"desire": "wire", "higher": "tire"},
                   "unrelated": {"desire": "love", "higher": "glove"}}},
        # the first line ends on a word of two tokens (KIT_SPLITS) and every candidate rhyme is one
        # token: no counterfactual keeps the prompt's positions, so the positive control must drop it
        {"id": "lake_gleam",
         "text": "The lake reflected every silver gleam,\nAnd all the night was quiet as a",
         "families": {"original": ["dream", "stream"], "edited": ["light", "bright"],
                      "unrelated": ["stone", "bone"]},
         "edits": {"edited": {"dream": "light", "stream": "bright"},
                   "unrelated": {"dream": "stone", "stream": "bone"}}},
    ],
}

#: Words of hand-written test couplets (see :func:`couplet_tokenizer`).
COUPLET_WORDS = ("the a and i in to of my with down by over all every is was on at it his her "
                 "their beside slowly quiet came out fill night stars window glowed golden closed eyes "
                 "drifted wandered stream dream seem gleam beam stone bone light bright white sight rain "
                 "pain through heard sang bird word hill still fire desire").split()
#: A three-couplet battery for whole-run tests (see :func:`write_tiny_experiment`).
COUPLET_BATTERY: dict[str, Any] = {
    "name": "tiny",
    "prompts": [
        {"id": "stream_dream", "text": "I wandered slowly down beside the stream,\nAnd closed my eyes and drifted in a",
         "families": {"original": ["dream", "seem"], "edited": ["gleam", "beam"], "unrelated": ["stone", "bone"]},
         "edits": {"edited": {"dream": "gleam"}, "unrelated": {"dream": "stone"}}},
        {"id": "night_light", "text": "The stars came out to fill the quiet night,\nAnd every window glowed with golden",
         "families": {"original": ["light", "bright"], "edited": ["white", "sight"], "unrelated": ["rain", "pain"]},
         "edits": {"edited": {"light": "white", "bright": "sight"}, "unrelated": {"light": "rain", "bright": "pain"}}},
        {"id": "hill_still", "text": "I heard the bird up on the hill,\nAnd all the stream was quiet and",
         "families": {"original": ["still"], "edited": ["hill"], "unrelated": ["fire"]},
         "edits": {"edited": {"still": "hill"}, "unrelated": {"still": "fire"}}},
    ],
}
#: Words the kit's tokenizer spells with several tokens (as Gemma's does many words), so a method
#: that assumes one token per word, or counts positions in words, fails the kit: an edited and an
#: original family word (scored as multi-token branches), a word before the injection site, and
#: the last kit prompt's line-end word (the positive control finds no same-length rhyme for it).
KIT_SPLITS: dict[str, tuple[str, ...]] = {"gleam": ("gl", "eam"), "desire": ("des", "ire"),
                                          "wandered": ("wander", "ed")}
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
#: Words a plugin's own text (prompt templates, explanations) may use; unknown words map to <unk>.
EXTRA_WORDS = ("a couplet rhyming poem line lines second first last word words ends ending end "
               "with whose here is that the of or in planning plan next rhyme rhymes write "
               "user model").split()
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_battery(data: Mapping[str, Any] | None = None) -> Battery:
    """The kit's in-memory battery (validated like any battery YAML)."""
    return Battery.from_dict(dict(data or TINY_BATTERY), source="<steercmp.testing>")


def _battery_words(battery: Battery) -> list[str]:
    words: list[str] = []
    for p in battery.prompts:
        words += re.findall(r"[A-Za-z]+", p.text.lower())
        for fam in p.families.values():
            words += [w.lower() for w in fam]
        for edit in p.edits.values():
            words += [w.lower() for pair in edit.items() for w in pair]
    return words


def tiny_tokenizer(words: Iterable[str], vocab_size: int = 512,
                   splits: Mapping[str, Sequence[str]] | None = None) -> Any:
    """A word-level tokenizer in Gemma's style (``' dream'`` -> ``'▁dream'``) with a chat template.

    Every word is one token, except the words of ``splits``, spelled by their pieces (``gleam``
    -> ``▁gl`` ``eam``: greedy longest-match, as WordPiece without a continuation prefix)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    splits = {w.lower(): tuple(p.lower() for p in parts) for w, parts in (splits or {}).items()}
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    pieces = ["\n", ",", ".", "!", "?", "'", '"', ":", ";", "(", ")", "-"]
    for w in dict.fromkeys(w.lower() for w in (*EXTRA_WORDS, *words)):
        head, *tail = splits.get(w, (w,))
        pieces += [head, head.capitalize(), "▁" + head, "▁" + head.capitalize(), *tail]
    for piece in pieces:
        if piece not in vocab and len(vocab) < vocab_size:
            vocab[piece] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="",
                                     max_input_chars_per_word=64))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n|[,.!?'\":;()\-]"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(**overrides: Any) -> Any:
    """A ~200k-parameter Gemma 3 text config (vocabulary 512); override any field."""
    from transformers import Gemma3TextConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, vocab_size=512, max_position_embeddings=256,
               sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
               pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")
    cfg.update(overrides)
    return Gemma3TextConfig(**cfg)


def tiny_model(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A ~200k-parameter random Gemma 3 text model (widened init, so layers actually mix)."""
    from transformers import Gemma3ForCausalLM

    gen = torch.Generator().manual_seed(seed)
    model = Gemma3ForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def tiny_lm(battery: Battery | None = None, seed: int = 0,
            splits: Mapping[str, Sequence[str]] | None = KIT_SPLITS) -> LoadedModel:
    """The tiny model and a tokenizer that knows every word of ``battery`` (default: the kit's),
    the words of ``splits`` spelled by several tokens (default :data:`KIT_SPLITS`; ``None``: one
    token per word)."""
    battery = battery or tiny_battery()
    return LoadedModel(model=tiny_model(seed), tokenizer=tiny_tokenizer(_battery_words(battery), splits=splits),
                       source="steercmp.testing", path="", dtype=torch.float32, device="cpu")


def couplet_tokenizer(words: Iterable[str] = (), vocab_size: int = 512) -> Any:
    """:func:`tiny_tokenizer` over :data:`COUPLET_WORDS` plus ``words``: enough vocabulary for
    hand-written couplets in tests."""
    return tiny_tokenizer([*COUPLET_WORDS, *words], vocab_size=vocab_size)


def save_tiny_checkpoint(path: str | Path, battery: Battery | None = None, seed: int = 0, *,
                         words: Iterable[str] | None = None, splits: Mapping[str, Sequence[str]] | None = None,
                         **overrides: Any) -> Path:
    """Write the tiny model and its tokenizer to ``path``: a local model directory for
    ``model: {id: PATH}`` in an experiment (a whole-:class:`~steercmp.run.runner.Runner` test).

    The tokenizer knows ``battery``'s words, or, given ``words``, :data:`COUPLET_WORDS` plus
    ``words``; by default both the kit's battery and :data:`COUPLET_BATTERY` (what
    :func:`write_tiny_experiment` writes), so the whole-run helpers work together as they are.
    ``splits`` spells words with several tokens (e.g. :data:`KIT_SPLITS`; default one token per
    word). ``overrides`` change the model config."""
    path = Path(path)
    model = tiny_model(seed, **overrides)
    model.save_pretrained(path, safe_serialization=True)
    vocab = model.config.vocab_size
    if words is None and battery is None:
        words = [*battery_vocabulary(COUPLET_BATTERY), *_battery_words(tiny_battery())]
    tok = tiny_tokenizer([*COUPLET_WORDS, *words] if words is not None else _battery_words(battery or tiny_battery()),
                         vocab_size=vocab, splits=splits)
    tok.save_pretrained(path)
    return path


def words_of(text: str) -> list[str]:
    """The lower-case words of ``text`` (to give a tiny tokenizer a text's vocabulary)."""
    return re.findall(r"[A-Za-z]+", text.lower())


def tiny_experiment(method: str = "method", options: Mapping[str, Any] | None = None, *,
                    layer: int = 2, seed: int = 0, chat_template: bool = False,
                    battery: Battery | None = None) -> Experiment:
    """An :class:`~steercmp.config.Experiment` describing the kit's setup (what a method receives)."""
    return Experiment.from_dict({
        "name": "conformance", "seed": seed, "layer": layer, "battery": "<steercmp.testing>",
        "model": {"id": "steercmp-testing:tiny", "chat_template": chat_template},
        "alphas": [0, 1, 2], "scalings": list(SCALINGS), "decision": {"alphas": [2]},
        "methods": [{"name": method, "options": dict(options or {})}],
    }, source="<steercmp.testing>", battery=battery or tiny_battery())


def tiny_contexts(lm: LoadedModel, battery: Battery | None = None, layer: int = 2,
                  chat_template: bool = False) -> list[PromptContext]:
    """Capture :class:`PromptContext` objects exactly as the runner's extract stage does."""
    battery = battery or tiny_battery()
    return extract(lm, layer, battery.prompts, chat_template=chat_template)




def write_tiny_experiment(folder: str | Path, model_dir: str | Path, *, battery: Mapping[str, Any] | None = None,
                          **overrides: Any) -> Path:
    """Write ``battery.yaml`` (default :data:`COUPLET_BATTERY`) and ``exp.yaml`` into ``folder``:
    the tiny checkpoint at layer 1, alphas -1/0/2, both scalings, ``unembed_direction``, two
    completion seeds, decision alpha 2. ``overrides`` replace top-level experiment keys."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "battery.yaml").write_text(yaml.safe_dump(dict(battery or COUPLET_BATTERY)))
    exp = {"name": "tiny", "model": {"id": str(model_dir)}, "layer": 1, "battery": "battery.yaml",
           "alphas": [-1, 0, 2], "scalings": ["raw", "norm_relative"], "methods": ["unembed_direction"],
           "completions": {"seeds": 2, "alphas": [0, 2], "max_new_tokens": 3}, "decision": {"alphas": [2]}}
    exp.update(overrides)
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def battery_vocabulary(battery: Mapping[str, Any]) -> list[str]:
    """Every family word of a battery mapping (what a tiny tokenizer must know to score it)."""
    return [w for p in battery["prompts"] for fam in p["families"].values() for w in fam]
