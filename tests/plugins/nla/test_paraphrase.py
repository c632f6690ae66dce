"""The paraphrase rule set: rewords framing, never the plan; bad rules are refused."""

import pytest

from steercmp.errors import ConfigError
from steercmp_plugins.nla.paraphrase import DEFAULT_RULES, paraphrase, parse_rules


def test_rewords_framing_and_keeps_plan_words():
    text = "The line ends with stream, so the next line should rhyme with -eam, planning dream or seem."
    out, applied = paraphrase(text, DEFAULT_RULES, ["dream", "seem", "stream"])
    assert out == ("The last word of the line is stream, which means the following line ought to rhyme "
                   "with -eam, aiming for dream or seem.")
    assert applied == ["the line ends with", "so the next line should rhyme with", "planning"]


def test_rule_that_would_touch_an_editable_term_is_skipped():
    rules = (("dream", "vision"), ("planning", "aiming for"))
    out, applied = paraphrase("planning dream", rules, ["dream"])
    assert out == "aiming for dream" and applied == ["planning"]


def test_no_rule_applies_leaves_text_unchanged():
    assert paraphrase("quux zorp", DEFAULT_RULES, ["quux"]) == ("quux zorp", [])


@pytest.mark.parametrize("rules, message", [
    ({"planning": "PLANNING"}, "leaves the text unchanged"),
    ({}, "is empty"),
    ({"planning": ""}, "non-empty"),
    ("planning", "must be a mapping"),
])
def test_bad_rules_are_refused(rules, message):
    with pytest.raises(ConfigError, match=message):
        parse_rules(rules, "methods.nla_text_edit.paraphrase_rules")


def test_rules_as_pairs_and_defaults():
    assert parse_rules([["a b", "c d"]], "x") == (("a b", "c d"),)
    assert parse_rules(None, "x") == DEFAULT_RULES
