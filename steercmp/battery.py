"""Prompt batteries: one YAML format (docs/schemas.md), validated before any model loads.

A battery is a tuple of :class:`steercmp.api.Prompt`. Structural checks (ids, families, edit
maps, position-rule syntax) run on load; tokenizer checks (family words known to the vocabulary,
position rules that resolve) run in :func:`steercmp.lm.prompts.tokenize_battery` once a
tokenizer exists; it tokenizes each prompt once, for every stage of the run.

Position rules are strings so batteries stay plain YAML: ``first_line_end`` (the first token of
the last word of line 1), ``first_line_break`` (the token holding
the first "\\n"), ``last``, ``token:N`` (absolute index, negative from the end) and
``regex:PATTERN`` (the token where the single match starts).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from steercmp.api import Prompt
from steercmp.errors import ConfigError

FAMILIES = ("original", "edited", "unrelated")
RULE_KINDS = ("first_line_break", "first_line_end", "last", "token:N", "regex:PATTERN")


def check_rule_syntax(rule: str) -> None:
    """Validate a rule's spelling without a tokenizer (config validation, before models load)."""
    if rule in ("first_line_break", "first_line_end", "last"):
        return
    if rule.startswith("token:"):
        try:
            int(rule.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"position rule {rule!r} needs an integer after 'token:'",
                              fix="write e.g. token:-1") from None
        return
    if rule.startswith("regex:"):
        try:
            re.compile(rule.split(":", 1)[1])
        except re.error as exc:
            raise ConfigError(f"position rule {rule!r} is not a valid regex ({exc})",
                              fix="escape special characters") from None
        return
    raise ConfigError(f"unknown position rule {rule!r}", fix=f"use one of {', '.join(RULE_KINDS)}")

ID_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")
WORD_PATTERN = re.compile(r"^[A-Za-z][A-Za-z'\-]*$")


def read_yaml(path: Path, what: str) -> Any:
    """Read a YAML file with one-line errors for missing files and malformed YAML."""
    if not path.exists():
        raise ConfigError(f"{what} file not found", where=str(path), fix="check the path")
    if not path.is_file():
        raise ConfigError(f"{what} path is not a file", where=str(path), fix="point at a YAML file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"malformed YAML{at}: {problem}", where=str(path),
                          fix="fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise ConfigError("file is not UTF-8 text", where=str(path), fix="save it as UTF-8") from None


@attrs.frozen
class Battery:
    """An ordered, validated set of prompts and where it came from."""

    name: str
    prompts: tuple[Prompt, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    def by_id(self) -> dict[str, Prompt]:
        return {p.id: p for p in self.prompts}

    def content_hash(self) -> str:
        """A hash of everything that determines results (ids, texts, families, edits, rules)."""
        payload = [attrs.asdict(p) for p in self.prompts]
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]

    def subset(self, ids: Sequence[str]) -> Battery:
        keep = set(ids)
        return attrs.evolve(self, prompts=tuple(p for p in self.prompts if p.id in keep))

    @classmethod
    def from_yaml(cls, path: str | Path) -> Battery:
        path = Path(path)
        data = read_yaml(path, "battery")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<battery>") -> Battery:
        if not isinstance(data, Mapping):
            raise ConfigError("a battery must be a mapping with a `prompts` list", where=source,
                              fix="see docs/schemas.md for the battery format")
        defaults = data.get("defaults") or {}
        raw_prompts = data.get("prompts")
        if not isinstance(raw_prompts, list) or not raw_prompts:
            raise ConfigError("`prompts` must be a non-empty list", where=f"{source}: prompts",
                              fix="add at least one prompt")
        prompts: list[Prompt] = []
        seen: set[str] = set()
        for i, raw in enumerate(raw_prompts):
            prompt = _parse_prompt(raw, defaults, f"{source}: prompts[{i}]")
            if prompt.id in seen:
                raise ConfigError(f"duplicate prompt id {prompt.id!r}", where=f"{source}: prompts[{i}].id",
                                  fix="give every prompt a unique id")
            seen.add(prompt.id)
            prompts.append(prompt)
        return cls(name=str(data.get("name") or Path(source).stem), prompts=tuple(prompts), source=source)


def _parse_prompt(raw: Any, defaults: Mapping[str, Any], where: str) -> Prompt:
    if not isinstance(raw, Mapping):
        raise ConfigError("each prompt must be a mapping", where=where, fix="see docs/schemas.md")
    pid = raw.get("id")
    if not isinstance(pid, str) or not ID_PATTERN.match(pid):
        raise ConfigError(f"prompt id {pid!r} is missing or not [A-Za-z0-9_-]+", where=f"{where}.id",
                          fix="use a short identifier such as stream_dream")
    where = f"{where} ({pid})"
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("prompt text is missing or empty", where=f"{where}.text",
                          fix="write the couplet, the second line up to its last word")
    fams_raw = raw.get("families")
    if not isinstance(fams_raw, Mapping):
        raise ConfigError("`families` is missing", where=f"{where}.families",
                          fix="give original, edited and unrelated word lists")
    families: dict[str, tuple[str, ...]] = {}
    for fam in FAMILIES:
        words = fams_raw.get(fam)
        if words is None:
            raise ConfigError(f"family {fam!r} is missing", where=f"{where}.families.{fam}",
                              fix=f"add a `{fam}` word list")
        if isinstance(words, str):
            words = [words]
        if not isinstance(words, list) or len(words) == 0:
            raise ConfigError(f"family {fam!r} is empty", where=f"{where}.families.{fam}",
                              fix="list at least one word")
        for w in words:
            if not isinstance(w, str) or not WORD_PATTERN.match(w):
                raise ConfigError(f"family word {w!r} is not a plain word", where=f"{where}.families.{fam}",
                                  fix="use letters only, one word per entry")
        families[fam] = tuple(dict.fromkeys(w.lower() for w in words))
    unknown = set(fams_raw) - set(FAMILIES)
    if unknown:
        raise ConfigError(f"unknown family {sorted(unknown)[0]!r}", where=f"{where}.families",
                          fix=f"families are {', '.join(FAMILIES)}")
    edits_raw = raw.get("edits") or {}
    if not isinstance(edits_raw, Mapping):
        raise ConfigError("`edits` must map edited/unrelated to word maps", where=f"{where}.edits",
                          fix="e.g. edits: {edited: {dream: gleam}}")
    edits: dict[str, dict[str, str]] = {}
    for fam, mapping in edits_raw.items():
        if fam not in ("edited", "unrelated"):
            raise ConfigError(f"unknown edit map {fam!r}", where=f"{where}.edits",
                              fix="edit maps are `edited` and `unrelated`")
        if not isinstance(mapping, Mapping) or not mapping:
            raise ConfigError(f"edit map {fam!r} is empty or not a mapping", where=f"{where}.edits.{fam}",
                              fix="map original words to replacement words")
        edits[fam] = {str(k): str(v) for k, v in mapping.items()}
    inject = str(raw.get("inject", defaults.get("inject", "first_line_break")))
    score = str(raw.get("score", defaults.get("score", "last")))
    for field, rule in (("inject", inject), ("score", score)):
        try:
            check_rule_syntax(rule)
        except ConfigError as exc:
            raise ConfigError(exc.message, where=f"{where}.{field}", fix=exc.fix) from None
    return Prompt(id=pid, text=text, families=families, edits=edits, inject=inject, score=score,
                  rhyme=str(raw.get("rhyme", "")), meta=dict(raw.get("meta") or {}))


def hygiene_problems(battery: Battery) -> list[str]:
    """Design faults that bias a battery's score, one line each (``scripts/check_battery.py``):

    - an edit key (a word a text-edit method replaces in an explanation) that already occurs in
      the prompt text: an explanation that merely repeats the text would be "edited";
    - families of unequal size: a family's mass is a log-sum-exp over its words, so a larger
      family has more mass before any steering.
    """
    problems = []
    for p in battery.prompts:
        words = set(re.findall(r"[a-z']+", p.text.lower()))
        keys = sorted({k.lower() for edit in p.edits.values() for k in edit} & words)
        if keys:
            problems.append(f"{p.id}: edit key(s) {', '.join(keys)} already occur in the prompt text")
        sizes = {fam: len(ws) for fam, ws in p.families.items()}
        if len(set(sizes.values())) > 1:
            problems.append(f"{p.id}: families of unequal size ("
                            + ", ".join(f"{fam} {n}" for fam, n in sizes.items()) + ")")
    return problems
