"""The prompting baseline: ask for the edited rhyme in the text instead of editing activations.

AxBench found plain prompting a strong baseline that steering methods often fail to beat, so
every comparison carries it. The method returns ``prompt_text`` proposals: a short context that
names the target family's word, followed by the original couplet, so the scoring slot (the
token before the rhyme word) is unchanged and the same logmass score applies. The runner
re-tokenizes the text and records ``alpha_applies: false`` (alpha has nothing to scale).

Forms (the ``form`` option; ``auto`` picks by ``model.chat_template``):

- ``base``: a document-style heading for base models, on the couplet's own first line, so the
  couplet's line break stays the first one in the text (its planning position is unchanged)::

      A rhyming couplet whose second line ends with the word "gleam": I wandered ...

- ``instruction``: for chat models the couplet sits in the model's turn (after the user turn
  steercmp writes); the model opens its answer by restating the constraint::

      Here is a couplet whose second line ends with the word "gleam": I wandered ...

``template`` overrides both: a string with ``{word}`` (the first word of the family),
``{words}`` (all of them, joined with "or") and ending in ``{text}`` (the original prompt).
``mention: all`` names every word of the family instead of the first.
Controls: ``noop`` applies (the original prompt); ``random_delta`` and ``wrong_position`` have
no meaning for a text intervention and are recorded as ``not_applicable``.
"""

from __future__ import annotations

from collections.abc import Sequence

from steercmp.api import (
    PROPOSAL_FAMILIES,
    ConfigError,
    Method,
    MethodRuntime,
    PromptContext,
    Proposal,
)
from steercmp.hookspecs import hookimpl

TEMPLATES = {
    "base": 'A rhyming couplet whose second line ends with {mention}: {text}',
    "instruction": 'Here is a couplet whose second line ends with {mention}: {text}',
}
FORMS = ("auto", "base", "instruction")
MENTIONS = ("first", "all")


def mention_words(words: Sequence[str], mention: str) -> str:
    """``the word "gleam"`` or ``one of the words "gleam" or "beam"``."""
    if mention == "first" or len(words) == 1:
        return f'the word "{words[0]}"'
    return "one of the words " + " or ".join(f'"{w}"' for w in words)


def render(template: str, words: Sequence[str], text: str, mention: str = "first") -> str:
    """Fill a prompting template for one prompt text and one family's words."""
    return template.format(mention=mention_words(words, mention), word=words[0],
                           words=" or ".join(words), text=text)


class Prompting(Method):
    name = "prompting"
    intervention = "prompt"
    description = "baseline: name the target rhyme word in the prompt text instead of steering"

    def _where(self, key: str) -> str:
        return f"methods.{self.name}.options.{key}"

    def validate(self) -> None:
        known = {"form", "template", "mention"}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ConfigError(f"unknown prompting option {unknown[0]!r}", where=self._where(unknown[0]),
                              fix=f"valid options are {', '.join(sorted(known))}")
        form = self.options.get("form", "auto")
        if form not in FORMS:
            raise ConfigError(f"form {form!r} is not one of {', '.join(FORMS)}", where=self._where("form"),
                              fix="use auto, base or instruction")
        mention = self.options.get("mention", "first")
        if mention not in MENTIONS:
            raise ConfigError(f"mention {mention!r} is not one of {', '.join(MENTIONS)}",
                              where=self._where("mention"), fix="use first or all")
        template = self.options.get("template")
        if template is not None:
            if not isinstance(template, str) or not template.endswith("{text}"):
                raise ConfigError("template must be a string ending in {text}", where=self._where("template"),
                                  fix='e.g. "Rhyme with {word}: {text}" (the scoring slot must stay last)')
            try:
                render(template, ["w"], "t")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"template has an unknown placeholder: {exc}", where=self._where("template"),
                                  fix="use only {word}, {words}, {mention} and {text}") from None

    @property
    def form(self) -> str:
        form = self.options.get("form", "auto")
        if form != "auto":
            return form
        chat = self.settings.chat_template
        return "instruction" if chat else "base"

    @property
    def template(self) -> str:
        return self.options.get("template") or TEMPLATES[self.form]

    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> Sequence[Proposal]:
        mention = self.options.get("mention", "first")
        out = []
        for ctx in contexts:
            for family in PROPOSAL_FAMILIES:
                words = list(ctx.prompt.families[family])
                text = render(self.template, words, ctx.prompt.text, mention)
                out.append(Proposal(prompt_id=ctx.prompt.id, family=family, prompt_text=text,
                                    meta={"form": self.form, "words": words, "mention": mention}))
        return out


@hookimpl
def register_methods(register):
    register(Prompting)
