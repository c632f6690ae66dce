"""Resume keys: what each stage's outputs depend on, hashed.

A stage (or a (method, prompt) unit of one) is reused only when its key matches the ledger
(``stages.json``) or its unit file exists. A key covers the config fields the outputs depend on,
the base checkpoint's file hashes, the battery's content, the seed, and the SOURCE of every
package or module whose code produces them (:data:`STAGE_CODE`), so editing the code that builds
cells or scores them invalidates what it built.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from steercmp import __version__
from steercmp.api import Control, Method
from steercmp.config import Experiment
from steercmp.hashing import stable_hash
from steercmp.lm.device import resolve_dtype_name

STAGES = ("extract", "propose", "score", "completions", "match")

#: bump a stage's version when its outputs change meaning; the code hash below also covers edits
STAGE_VERSIONS = {"extract": "2", "propose": "2", "score": "3", "completions": "2", "match": "1", "locate": "1"}
#: the packages and modules whose source determines each stage's outputs (a package = all its files)
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "extract": ("steercmp.lm", "steercmp.battery", "steercmp.run.stage_extract"),
    "propose": ("steercmp.api", "steercmp.run.proposals", "steercmp.run.runtime", "steercmp.run.stage_propose"),
    "score": ("steercmp.lm", "steercmp.score", "steercmp.battery", "steercmp.run.cells",
              "steercmp.run.proposals", "steercmp.schemas", "steercmp.run.stage_score"),
    "completions": ("steercmp.lm", "steercmp.score", "steercmp.run.cells", "steercmp.schemas",
                    "steercmp.run.stage_completions"),
    "match": ("steercmp.lm", "steercmp.score", "steercmp.run.match", "steercmp.run.cells", "steercmp.schemas",
              "steercmp.run.stage_match"),
    # ``steercmp locate``'s stage (not one of STAGES: ``run`` does not take it)
    "locate": ("steercmp.lm", "steercmp.score", "steercmp.battery", "steercmp.couplets", "steercmp.run.stage_locate"),
}
_FILE_DIGESTS: dict[str, str] = {}


def _file_digest(path: Path) -> str:
    key = str(path)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return _FILE_DIGESTS[key]


def module_code_hash(module_name: str) -> str:
    """A hash of a module's source. A package hashes all its files; so does a module inside a
    plugin package (an edit in the NLA plugin's ``av.py`` must invalidate its proposals)."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    file = getattr(module, "__file__", None)
    if not file:
        return "builtin"
    path = Path(file)
    whole_package = path.name == "__init__.py" or (
        not module_name.startswith("steercmp.") and module_name.count(".") >= 2)
    if whole_package:
        files = sorted(path.parent.rglob("*.py"))
        return stable_hash([(str(f.relative_to(path.parent)), _file_digest(f)) for f in files])
    return _file_digest(path)


def sample_groups(prompt_ids: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """Prompts in consecutive blocks of ``size`` (``completions.prompt_group``), in battery order.

    Their unsteered rows are sampled in one batch: 4 prompts at 5 seeds stream the model's
    weights a quarter as often as one prompt at a time, where such small batches are bound by that
    streaming. In bf16 a sampled text depends on the batch it was drawn in, so the batches are
    fixed by the battery and the same whoever draws them: a single run, a shard (shards are cut
    between groups) or a resumed run."""
    ids = list(prompt_ids)
    return [tuple(ids[s:s + size]) for s in range(0, len(ids), size)]


def stage_code_hash(stage: str) -> str:
    return stable_hash({"version": STAGE_VERSIONS[stage], "steercmp": __version__,
                        "modules": {m: module_code_hash(m) for m in STAGE_CODE[stage]}})


@attrs.define
class RunKeys:
    """Every key of one experiment's run: stages, methods' proposals and (method, prompt) units.

    ``model_identity`` is the base checkpoint's id, revision and file hashes (read once)."""

    experiment: Experiment
    methods: Mapping[str, Method]
    controls: Mapping[str, Control]
    model_identity: Mapping[str, Any]

    def stage(self, stage: str, payload: Any) -> str:
        return stable_hash({"stage": stage, "code": stage_code_hash(stage), "payload": payload})

    def _model(self) -> dict[str, Any]:
        exp = self.experiment
        model = attrs.asdict(exp.model)
        model["dtype"] = resolve_dtype_name(exp.model.dtype, exp.model.device)  # auto -> this machine's
        model.pop("device", None)  # the same numbers are expected on any device of one dtype
        model.pop("device_map", None)
        return {"model": model, "checkpoint": dict(self.model_identity), "battery": exp.battery.content_hash()}

    def extract(self) -> str:
        exp = self.experiment
        return self.stage("extract", {**self._model(), "layer": exp.layer,
                                      "single_token_families": exp.single_token_families})

    def locate_unit(self, layer: int, pairs: Sequence[tuple[str, str, str, str]],
                    offsets: tuple[int, int] | None) -> str:
        """One layer of ``steercmp locate``: the model, the battery, the counterfactual pairs
        (prompt, family, construction, word) and the scanned offsets; not the experiment's layer
        or methods."""
        return self.stage("locate", {**self._model(), "layer": layer, "pairs": [list(p) for p in pairs],
                                     "offsets": list(offsets) if offsets else None})

    def propose(self, method: str) -> str:
        spec = next(s for s in self.experiment.methods if s.key == method)
        return self.stage("propose", {"extract": self.extract(), "method": spec.name,
                                      "method_code": module_code_hash(type(self.methods[method]).__module__),
                                      "options": dict(spec.options), "seed": self.experiment.seed})

    def _controls(self) -> list[Any]:
        exp = self.experiment
        return [[name, dict(exp.control_options.get(name, {})),
                 module_code_hash(type(control).__module__)] for name, control in self.controls.items()]

    def _unit_payload(self, method: str, pid: str, alphas: Sequence[float]) -> dict[str, Any]:
        exp = self.experiment
        return {"propose": self.propose(method), "prompt": pid, "alphas": list(alphas),
                "scalings": list(exp.scalings), "controls": self._controls(), "seed": exp.seed}

    def score_unit(self, method: str, pid: str) -> str:
        """What one (method, prompt) block of cells depends on, and nothing else."""
        return stable_hash({"code": stage_code_hash("score"),
                            **self._unit_payload(method, pid, self.experiment.alphas)})

    def completion_unit(self, method: str, pid: str) -> str:
        exp = self.experiment
        alphas = [a for a in exp.alphas if a in exp.completions.alphas]
        return stable_hash({"code": stage_code_hash("completions"), "score_code": stage_code_hash("score"),
                            "completions": attrs.asdict(exp.completions),
                            **self._unit_payload(method, pid, alphas)})

    def sample_groups(self) -> list[tuple[str, ...]]:
        """The battery's sampling groups (:func:`sample_groups`)."""
        exp = self.experiment
        return sample_groups([p.id for p in exp.battery.prompts], exp.completions.prompt_group)

    def completion_baseline(self, pid: str) -> str:
        """One prompt's unsteered completions, shared by every method (sampled with its group's)."""
        group = next(g for g in self.sample_groups() if pid in g)
        return stable_hash({"code": stage_code_hash("completions"), "extract": self.extract(), "prompt": pid,
                            "completions": attrs.asdict(self.experiment.completions), "seed": self.experiment.seed,
                            "baseline": True, "group": list(group)})

    def match_unit(self, pid: str, part: str, pc: str | None) -> str:
        """One part of a prompt's matched-dose rows and completions: a method's own rows depend on
        its proposals, the positive control's (``pc``: it sets the budget), the controls, the
        decision block and the completion settings; the shared part (``*``) on the positive
        control's proposals and the battery's prompts (donors come from them), not on any other
        method, so adding a method reuses every other part."""
        exp = self.experiment
        keys = {s.key for s in exp.methods}
        own = {part: self.propose(part)} if part in keys else {}
        budget = {pc: self.propose(pc)} if pc in keys else {}
        return stable_hash({"code": stage_code_hash("match"), "score_code": stage_code_hash("score"),
                            "prompt": pid, "part": part, "propose": {**own, **budget},
                            "controls": self._controls(), "seed": exp.seed,
                            "decision": {k: v for k, v in exp.decision_settings().items()
                                         if k in ("max_kl", "random_draws")},
                            "prompts": [p.id for p in exp.battery.prompts],
                            "completions": attrs.asdict(exp.completions)})

    def units(self, stage: str, methods: Sequence[str]) -> list[tuple[str, str, str]]:
        """``(method, prompt id, unit key)`` for every unit of ``stage`` (score or completions)."""
        unit_key = self.score_unit if stage == "score" else self.completion_unit
        return [(m, p.id, unit_key(m, p.id)) for m in methods for p in self.experiment.battery.prompts]

    def units_stage(self, stage: str, units: Sequence[tuple[str, str, str]]) -> str:
        return self.stage(stage, [u for _, _, u in units])

    def all_methods_stage(self, stage: str) -> str:
        """The stage key when every configured method contributes its units."""
        return self.units_stage(stage, self.units(stage, [s.key for s in self.experiment.methods]))
