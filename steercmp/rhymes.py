"""Deterministic rhyme utilities: rhyme sounds, rhyme families, couplets and plain prose.

Why this exists: steercmp's prompts are couplets whose first line ends where the model forms a
rhyme *plan*, and every score is a log-prob mass over rhyme *families*. Hand-typed families drift
and cannot be checked, so families are derived here from the CMU pronouncing dictionary (the
``pronouncing`` package): a word's rhyme sound is its phones from the last stressed vowel, and a
family is the set of common words sharing that sound. The same module generates template couplets
(the expanded battery, training prompts for methods that need them, with battery words held out)
and plain English sentences (a text corpus for SAE training, since no corpus can be downloaded).
Everything is a pure function of its arguments and seed: no model, no network.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pronouncing

__all__ = [
    "Couplet",
    "COUPLET_NOUNS",
    "couplet_rhyme_groups",
    "general_sentences",
    "is_common",
    "make_couplets",
    "rhyme_group",
    "rhyme_part",
    "rhymes_with",
    "single_token_filter",
]

# Concrete, everyday nouns that can end a line after "the". Only the *lexicon* is hand-picked (so
# a template line makes sense); which of them rhyme, and the families, come from the CMU dictionary.
COUPLET_NOUNS: tuple[str, ...] = (
    # IY1 M
    "dream", "stream", "beam", "gleam", "team", "cream", "steam", "seam", "theme",
    # AY1 T
    "light", "night", "kite", "sight", "height", "flight", "knight",
    # AO1 R
    "shore", "door", "floor", "core", "store", "roar", "oar", "war",
    # IH1 L
    "hill", "mill", "sill", "pill", "drill", "quill", "will",
    # OW1
    "snow", "glow", "crow", "show", "row", "toe", "flow",
    # AY1 ER0
    "fire", "desire", "choir", "wire", "tire",
    # ER1 D
    "bird", "word", "herd",
    # EY1 N
    "rain", "pane", "train", "chain", "lane", "plain", "grain", "crane", "cane", "brain",
    # AA1 R
    "star", "car", "jar", "bar", "guitar", "scar",
    # UW1 N
    "moon", "tune", "spoon", "dune", "balloon", "noon",
    # EY1 K
    "lake", "cake", "snake", "flake", "rake", "wake",
    # IY1
    "sea", "tree", "key", "bee", "knee", "tea",
    # AW1 N
    "town", "crown", "gown", "clown",
    # EY1 T
    "gate", "plate", "slate", "crate", "date",
    # EH1 D
    "bread", "bed", "thread", "head", "shed", "sled",
    # OW1 N
    "stone", "bone", "phone", "throne", "cone", "zone",
    # AE1 T
    "hat", "cat", "mat", "bat", "rat",
    # IH1 NG
    "ring", "king", "string", "wing", "spring", "swing",
    # AO1 L
    "wall", "ball", "hall", "call", "fall",
    # EH1 L
    "bell", "well", "shell", "spell", "hotel",
    # UH1 K
    "book", "brook", "hook", "nook", "cook",
    # AA1 K
    "clock", "rock", "sock", "dock", "lock", "flock",
    # EY1
    "day", "bay", "clay", "tray", "hay", "ray", "way",
    # IH1 P
    "ship", "trip", "lip", "chip", "whip",
    # OW1 T
    "boat", "coat", "goat", "note", "throat",
    # IH1 N
    "pin", "tin", "chin", "fin", "grin", "skin",
    # AH1 G
    "rug", "mug", "bug", "jug",
    # AO1 N
    "lawn", "dawn", "fawn",
)

_FIRST_LINES: tuple[str, ...] = (
    "I wandered slowly down beside the {w},",
    "We sat together quietly by the {w},",
    "She lingered for a moment near the {w},",
    "He told me stories all about the {w},",
    "The morning found us waiting by the {w},",
    "Through all the years I still recall the {w},",
    "My grandfather would often paint the {w},",
    "The children laughed and pointed at the {w},",
)

#: public: other generators (the mini NLA pair's training data) reuse the same first lines
FIRST_LINE_TEMPLATES = _FIRST_LINES

_SECOND_LINES: tuple[str, ...] = (
    "And then I turned and gazed upon the",
    "And all the while I thought about the",
    "And every night I dreamed about the",
    "But in the end we only found the",
    "And in my heart I kept the little",
    "So now I sit and think about the",
    "And when I woke I saw the shining",
    "Until at last I reached the distant",
)

_SUFFIXES = ("s", "es", "ed", "d", "ing", "er", "ers", "ly", "y")


@functools.cache
def _index() -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """(word -> rhyme part of its first pronunciation, rhyme part -> sorted words).

    Only first pronunciations count, so ``rhyme_group(w)`` always agrees with ``rhyme_part``.
    """
    pronouncing.init_cmu()
    first: dict[str, str] = {}
    groups: dict[str, set[str]] = {}
    for word, phones in pronouncing.pronunciations:  # a word's first listed pronunciation wins
        if word not in first:
            first[word] = part = pronouncing.rhyming_part(phones)
            groups.setdefault(part, set()).add(word)
    return first, {k: tuple(sorted(v)) for k, v in groups.items()}


def _clean(word: str) -> str:
    return word.strip().lower()


def rhyme_part(word: str) -> str | None:
    """CMU phones from the last stressed vowel of ``word``'s first pronunciation, e.g. ``"IY1 M"``.

    ``None`` for words outside the CMU dictionary.
    """
    return _index()[0].get(_clean(word))


def rhymes_with(a: str, b: str) -> bool:
    """Whether two different words share a rhyme sound (first pronunciations)."""
    pa, pb = rhyme_part(a), rhyme_part(b)
    return pa is not None and pa == pb and _clean(a) != _clean(b)


def is_common(word: str) -> bool:
    """A small frequency heuristic without a frequency list.

    Everyday words are in :data:`COUPLET_NOUNS`, or the CMU dictionary also lists at least two
    inflected/derived forms of them (``dream`` -> ``dreams``, ``dreamed``, ``dreamer``...), which
    rare surnames and odd spellings (``deam``, ``reim``) usually lack.
    """
    w = _clean(word)
    if w in COUPLET_NOUNS:
        return True
    if not (w.isalpha() and w.isascii() and len(w) >= 3):
        return False
    known = _index()[0]
    if w not in known:
        return False
    forms = {w + s for s in _SUFFIXES}
    if w.endswith("e"):
        forms |= {w[:-1] + "ing", w + "d", w + "r"}
    return sum(f in known for f in forms) >= 2


def rhyme_group(
    word: str,
    *,
    vocab_filter: Callable[[str], bool] | None = None,
    limit: int | None = None,
) -> list[str]:
    """Common words sharing ``word``'s rhyme sound (:func:`rhyme_part`), excluding ``word``, sorted.

    Kept: alphabetic ASCII, length >= 3, :func:`is_common`, and ``vocab_filter(w)`` when given
    (e.g. :func:`single_token_filter` for "one token in this tokenizer"). Sorted alphabetically,
    so the result is deterministic; ``limit`` truncates after sorting. Unknown word -> ``[]``.
    """
    part = rhyme_part(word)
    if part is None:
        return []
    w0 = _clean(word)
    out = [
        w for w in _index()[1].get(part, ())
        if w != w0 and w.isalpha() and w.isascii() and len(w) >= 3 and is_common(w)
        and (vocab_filter is None or vocab_filter(w))
    ]
    return out[:limit] if limit is not None else out


def single_token_filter(tokenizer) -> Callable[[str], bool]:  # noqa: ANN001 - any HF tokenizer
    """A ``vocab_filter`` keeping words whose leading-space form (``▁word`` / ``Ġword``) is one token."""

    @functools.cache
    def keep(word: str) -> bool:
        return len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1

    return keep


@dataclass(frozen=True)
class Couplet:
    """A couplet prompt: ``text`` is the first line (ending with ``line_end`` and a comma), a line
    break, and the second line up to but not including its last word; ``plan`` is the rhyme word
    that should come next and ``rhyme`` the shared sound (CMU phones)."""

    text: str
    line_end: str
    plan: str
    rhyme: str


@functools.cache
def _noun_groups() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Rhyme sound -> COUPLET_NOUNS with that sound (>= 2 of them), in a fixed order."""
    groups: dict[str, list[str]] = {}
    for w in COUPLET_NOUNS:
        part = rhyme_part(w)
        if part is not None:
            groups.setdefault(part, []).append(w)
    return tuple((k, tuple(v)) for k, v in sorted(groups.items()) if len(v) >= 2)


def couplet_rhyme_groups() -> list[tuple[str, tuple[str, ...]]]:
    """The rhyme sounds :func:`make_couplets` draws from: ``(rhyme part, nouns)`` sorted by
    rhyme part, each with at least two :data:`COUPLET_NOUNS` sharing that sound."""
    return list(_noun_groups())


def make_couplets(n: int, seed: int, *, exclude: Iterable[str] = ()) -> list[Couplet]:
    """``n`` template couplets, deterministic in ``seed``.

    Each pairs a line-end noun with a different noun of the same rhyme sound (the plan), a first
    line template ending with the line-end word and a second-line template that stops where the
    plan noun comes next. Rhyme sounds are visited round-robin so that sounds stay balanced; no
    (line_end, plan) pair repeats until all are used. Words in ``exclude`` are never used as
    line_end or plan (hold out a battery's prompts when training on couplets).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    banned = {_clean(w) for w in exclude}
    rng = random.Random(f"couplets:{seed}")
    per_sound: list[tuple[str, list[tuple[str, str]]]] = []
    for part, words in _noun_groups():
        ok = [w for w in words if w not in banned]
        pairs = [(a, b) for a in ok for b in ok if a != b]
        if pairs:
            rng.shuffle(pairs)
            per_sound.append((part, pairs))
    if not per_sound:
        if n:
            raise ValueError("every rhyme pair is excluded")
        return []
    rng.shuffle(per_sound)
    out: list[Couplet] = []
    rnd = 0
    while len(out) < n:
        for part, pairs in per_sound:
            if len(out) >= n:
                break
            line_end, plan = pairs[rnd % len(pairs)]
            first = rng.choice(_FIRST_LINES).format(w=line_end)
            second = rng.choice(_SECOND_LINES)
            out.append(Couplet(text=f"{first}\n{second}", line_end=line_end, plan=plan, rhyme=part))
        rnd += 1
    return out


_SUBJECTS = (
    "My neighbour", "The teacher", "A young doctor", "Our family", "The old farmer", "My sister",
    "The children", "A tired driver", "The baker", "Her brother", "The new manager", "A student",
    "The cat", "Our dog", "The small team", "My grandmother", "The waiter", "A local artist",
)
_VERBS = (
    "bought", "cleaned", "painted", "carried", "found", "cooked", "fixed", "borrowed", "opened",
    "washed", "sold", "moved", "visited", "wrote about", "looked at", "repaired",
)
_OBJECTS = (
    "a wooden chair", "the kitchen table", "some fresh bread", "an old bicycle", "the garden fence",
    "a blue jacket", "the front door", "a pot of soup", "the broken window", "a box of apples",
    "the morning newspaper", "a cup of coffee", "the red car", "a bag of rice", "the school bus",
    "a pair of shoes", "the library book", "a basket of eggs",
)
_PLACES = (
    "in the village", "near the station", "at the market", "behind the house", "in the city",
    "by the river", "at the office", "in the park", "on the farm", "at the hospital",
    "in the kitchen", "near the school",
)
_TIMES = (
    "on Monday", "last week", "this morning", "after lunch", "before dinner", "in the spring",
    "every Saturday", "yesterday evening", "during the winter", "at noon",
)
_ADJS = ("busy", "quiet", "warm", "cold", "long", "short", "pleasant", "difficult", "ordinary",
         "rainy", "sunny", "strange")
_NOUNS = ("day", "week", "meeting", "journey", "holiday", "afternoon", "lesson", "evening")
def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


_SENTENCE_TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f"{r.choice(_SUBJECTS)} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_PLACES)} {r.choice(_TIMES)}.",
    lambda r: f"{_cap(r.choice(_TIMES))}, {r.choice(_SUBJECTS).lower()} {r.choice(_VERBS)} {r.choice(_OBJECTS)}.",
    lambda r: f"It was a {r.choice(_ADJS)} {r.choice(_NOUNS)}, so {r.choice(_SUBJECTS).lower()} stayed {r.choice(_PLACES)}.",
    lambda r: f"{r.choice(_SUBJECTS)} said that the {r.choice(_NOUNS)} {r.choice(_PLACES)} was {r.choice(_ADJS)}.",
    lambda r: f"When {r.choice(_SUBJECTS).lower()} {r.choice(_VERBS)} {r.choice(_OBJECTS)}, everyone {r.choice(_PLACES)} noticed.",
    lambda r: f"{r.choice(_SUBJECTS)} usually {r.choice(('walks', 'drives', 'cycles', 'takes the bus'))} to work, but {r.choice(_TIMES)} the weather was {r.choice(_ADJS)}.",
    lambda r: f"Do you know why {r.choice(_SUBJECTS).lower()} {r.choice(_VERBS)} {r.choice(_OBJECTS)} {r.choice(_TIMES)}?",
    lambda r: f"There is {r.choice(_OBJECTS)} {r.choice(_PLACES)}, and {r.choice(_SUBJECTS).lower()} wants to keep it.",
)


def general_sentences(n: int, seed: int) -> list[str]:
    """``n`` plain English prose sentences about everyday subjects, deterministic in ``seed``
    (a training corpus for SAEs, which cannot download one)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(f"sentences:{seed}")
    return [rng.choice(_SENTENCE_TEMPLATES)(rng) for _ in range(n)]
