"""The parsed-tokenizer cache: folders holding the same tokenizer files (the base model, the NLA
AV and AR) share one parsed object (Gemma's costs ~0.34 GiB), each copy keeps its own folder's
chat template, and changed files parse again."""

from transformers import AutoTokenizer

from steercmp.lm import load
from steercmp.testing import tiny_tokenizer

TEXT = "the stream,\nand a dream"


def _save(tok, path, template=None):
    tok.chat_template = template
    tok.save_pretrained(path)
    return str(path)


def test_same_files_share_one_parse_and_keep_their_own_chat_template(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "_TOKENIZERS", {})
    tok = tiny_tokenizer(["stream", "dream"])
    plain = _save(tok, tmp_path / "base", None)
    chat = _save(tok, tmp_path / "av", "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    a, b = load.cached_tokenizer(plain), load.cached_tokenizer(chat)
    assert len(load._TOKENIZERS) == 1  # one parse serves both folders
    for ours, folder in ((a, plain), (b, chat)):
        ref = AutoTokenizer.from_pretrained(folder)
        assert ours.chat_template == ref.chat_template and ours.name_or_path == folder
        assert ours(TEXT)["input_ids"] == ref(TEXT)["input_ids"]
    assert a.chat_template is None and b.chat_template is not None
    b.chat_template = "changed"  # a copy's attributes are its own
    assert load.cached_tokenizer(chat).chat_template != "changed"


def test_changed_tokenizer_files_parse_again(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "_TOKENIZERS", {})
    first = _save(tiny_tokenizer(["stream"]), tmp_path / "one")
    second = _save(tiny_tokenizer(["stream", "gleam"]), tmp_path / "two")
    load.cached_tokenizer(first)
    assert "▁gleam" in load.cached_tokenizer(second).get_vocab() and len(load._TOKENIZERS) == 2
