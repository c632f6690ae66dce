"""Rhyme utilities: CMU rhyme sounds, families, template couplets and prose (no model)."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from steercmp import rhymes
from steercmp.rhymes import Couplet, general_sentences, make_couplets, rhyme_group, rhyme_part


def test_rhyme_part_from_last_stressed_vowel():
    assert rhyme_part("dream") == "IY1 M"
    assert rhyme_part("Stream") == "IY1 M"
    assert rhyme_part("desire") == "AY1 ER0"
    assert rhyme_part("light") == rhyme_part("night") == "AY1 T"
    assert rhyme_part("xqzzyq") is None


def test_rhymes_with():
    assert rhymes.rhymes_with("dream", "gleam")
    assert not rhymes.rhymes_with("dream", "dream")
    assert not rhymes.rhymes_with("dream", "stone")


def test_rhyme_group_common_sorted_and_rhyming():
    group = rhyme_group("dream")
    assert {"gleam", "beam", "stream", "seem"} <= set(group)
    assert "dream" not in group
    assert group == sorted(group)
    assert all(w.isalpha() and len(w) >= 3 for w in group)
    assert all(rhyme_part(w) == "IY1 M" for w in group)
    # surnames / odd spellings without inflected forms are dropped
    assert "deam" not in group and "beahm" not in group
    assert rhyme_group("dream", limit=3) == group[:3]
    assert rhyme_group("xqzzyq") == []


def test_rhyme_group_vocab_filter():
    keep = {"gleam", "beam"}
    assert rhyme_group("dream", vocab_filter=keep.__contains__) == ["beam", "gleam"]


def test_single_token_filter():
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [1] if text.strip() in {"beam"} else [1, 2]

    keep = rhymes.single_token_filter(Tok())
    assert keep("beam") and not keep("gleam")


def test_make_couplets_shape_and_rhyme():
    cs = make_couplets(40, seed=3)
    assert len(cs) == 40
    for c in cs:
        first, second = c.text.split("\n")
        assert first.endswith(f" {c.line_end},")
        assert not c.text.endswith((" ", "\n"))
        assert c.plan != c.line_end
        assert rhyme_part(c.plan) == rhyme_part(c.line_end) == c.rhyme
        assert c.plan not in second.split()[-1:]
    assert len({c.rhyme for c in cs}) >= 12
    with pytest.raises(dataclasses.FrozenInstanceError):
        cs[0].plan = "x"  # type: ignore[misc]


def test_make_couplets_deterministic_and_seeded():
    assert make_couplets(20, seed=1) == make_couplets(20, seed=1)
    assert make_couplets(20, seed=1) != make_couplets(20, seed=2)
    assert make_couplets(0, seed=1) == []
    assert isinstance(make_couplets(1, seed=0)[0], Couplet)


def test_make_couplets_exclude_and_many():
    held = ["dream", "stream", "light", "night", "shore", "more", "snow", "glow"]
    cs = make_couplets(300, seed=0, exclude=held)
    assert len(cs) == 300
    assert not {c.line_end for c in cs} & set(held)
    assert not {c.plan for c in cs} & set(held)
    with pytest.raises(ValueError):
        make_couplets(1, seed=0, exclude=rhymes.COUPLET_NOUNS)


def test_general_sentences():
    s = general_sentences(50, seed=0)
    assert len(s) == 50 and s == general_sentences(50, seed=0)
    assert s != general_sentences(50, seed=1)
    assert len(set(s)) > 40
    assert all(x[0].isupper() and x[-1] in ".?" for x in s)
    assert general_sentences(0, seed=0) == []


# --- shipped batteries: structure and rhyme consistency (no model) ---------------------------

BATTERIES = Path(__file__).resolve().parents[1] / "experiments" / "batteries"
NOTE8 = ["bird_word", "fire_desire", "hill_still", "night_light", "rain_pane", "shore_more",
         "snow_glow", "stream_dream"]


def _prompts(name):
    data = yaml.safe_load((BATTERIES / name).read_text())
    assert data["version"] == 1 and data["name"] == name.removesuffix(".yaml")
    return data["prompts"]


@pytest.mark.parametrize("name", ["note8.yaml", "expanded.yaml"])
def test_battery_families_rhyme(name):
    prompts = _prompts(name)
    assert len({p["id"] for p in prompts}) == len(prompts)
    for p in prompts:
        line_end, plan = p["id"].split("_")
        first, second = p["text"].split("\n")
        assert first.rstrip(",.;").endswith(line_end) and not second.endswith(" ")
        fams = p["families"]
        assert set(fams) == {"original", "edited", "unrelated"} and all(fams.values())
        assert fams["original"][0] == plan
        assert rhyme_part(line_end) == p["rhyme"]
        for w in fams["original"] + fams["edited"]:
            assert rhyme_part(w) == p["rhyme"], (p["id"], w)
        for w in fams["unrelated"]:
            assert rhyme_part(w) != p["rhyme"], (p["id"], w)
        for fam in ("edited", "unrelated"):
            assert set(p["edits"][fam]) <= set(fams["original"])
            assert set(p["edits"][fam].values()) <= set(fams[fam])


def test_note8_ids_and_expanded_size():
    assert [p["id"] for p in _prompts("note8.yaml")] == NOTE8
    expanded = _prompts("expanded.yaml")
    assert len(expanded) >= 48 and len({p["rhyme"] for p in expanded}) >= 12
    assert not {p["id"] for p in expanded} & set(NOTE8)


def test_generator_deterministic_without_model():
    spec = importlib.util.spec_from_file_location(
        "generate_battery", BATTERIES.parents[1] / "scripts" / "generate_battery.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    keep = lambda w: w not in {"gleam", "oar"}  # noqa: E731
    a, b = gen.build(48, 0, keep), gen.build(48, 0, keep)
    assert a == b and len(a) == 48
    text = gen.render(a, 48, 0)
    assert text.startswith("# GENERATED FILE")
    assert yaml.safe_load(text)["prompts"] == a
