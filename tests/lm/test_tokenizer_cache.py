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


def test_cached_tokenizer_drops_the_python_tables_it_was_built_from(tmp_path, monkeypatch):
    """transformers 5's GemmaTokenizer keeps the vocabulary dict and merges list it built its Rust
    backend from (0.14 GiB for Gemma 3's); the cache drops them, and encoding, decoding, the
    vocabulary and the saved files stay those of a fresh load."""
    from transformers import GemmaTokenizer

    monkeypatch.setattr(load, "_TOKENIZERS", {})
    vocab, merges = _bpe_tables()
    folder = tmp_path / "gemma"
    GemmaTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    ref = AutoTokenizer.from_pretrained(folder)
    assert isinstance(ref._vocab, dict) and len(ref._merges) == len(merges)  # what transformers keeps

    ours = load.cached_tokenizer(str(folder))
    for shared in (ours, load._TOKENIZERS[next(iter(load._TOKENIZERS))]):
        assert not hasattr(shared, "_vocab") and not hasattr(shared, "_merges")
    ids = ref(TEXT)["input_ids"]
    assert ours(TEXT)["input_ids"] == ids and len(set(ids)) > 4  # merged pieces, not bytes
    assert ours.decode(ids) == ref.decode(ids) and ours.get_vocab() == ref.get_vocab()
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_a_class_that_reads_its_tables_later_keeps_them():
    """Some tokenizer classes read ``_vocab`` after construction (Whisper's ``save_vocabulary``):
    theirs stay."""
    from transformers import GemmaTokenizer

    class ReadsLater(GemmaTokenizer):
        def first_piece(self):
            return next(iter(self._vocab))

    vocab, merges = _bpe_tables()
    kept = load.drop_construction_tables(ReadsLater(vocab=vocab, merges=merges))
    assert kept.first_piece() == "<pad>" and len(kept._merges) == len(merges)
    dropped = load.drop_construction_tables(GemmaTokenizer(vocab=vocab, merges=merges))
    assert not hasattr(dropped, "_vocab") and not hasattr(dropped, "_merges")


def _bpe_tables():
    """A small Gemma-style BPE vocabulary and merges that spell the test's words in a few pieces."""
    chars = ["▁", "t", "h", "e", "s", "r", "a", "m", "d", "n", ",", "\n"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("e", "a"), ("ea", "m"), ("r", "eam"), ("▁", "d"),
              ("▁d", "ream"), ("s", "t"), ("▁", "st"), ("▁st", "ream")]
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    for piece in chars + ["".join(m) for m in merges]:
        vocab.setdefault(piece, len(vocab))
    return vocab, merges
