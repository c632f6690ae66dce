"""The plugin authors' conformance kit: check a method or control from any pytest suite.

One line in a plugin's own tests::

    import steercmp.testing

    def test_conformance():
        steercmp.testing.check_method(MyMethod)

:func:`check_method` builds a tiny random-weight Gemma 3 model from a config (64-wide, 4 blocks,
a 512-token vocabulary in which the words of :data:`KIT_SPLITS` take two tokens), a four-prompt in-memory battery (one the positive control must drop) and a :class:`TestRuntime`,
then checks that the method

- registers under a unique name through a fresh plugin manager;
- validates its options and declares its resources (:class:`steercmp.api.Resource` objects with
  callable loaders and distinct names);
- returns one proposal per prompt and per family (``edited`` and ``unrelated``), with finite
  float32 ``[d_model]`` deltas (or, for ``intervention = "prompt"`` methods, non-empty text that
  keeps the original prompt's scoring slot), JSON-serialisable ``meta`` and in-range positions;
- proposes something different for the two families;
- is deterministic under a seed (two fresh instances, same runtime seed, identical proposals);
- leaves no hooks on the model and does not modify the contexts it reads;
- scores through the shared engine under both scaling conventions (``raw`` and
  ``norm_relative``) with finite log-masses.

Every failure raises :class:`ConformanceError` (an ``AssertionError``) naming the check. Nothing
here downloads anything; a check takes about a second on a CPU.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from steercmp.api import (
    PROPOSAL_FAMILIES,
    SCALINGS,
    Control,
    Method,
    MethodRuntime,
    PromptContext,
    Proposal,
    Resource,
)
from steercmp.battery import Battery
from steercmp.errors import PluginError
from steercmp.hashing import make_generator
from steercmp.lm.hooks import attached_hooks
from steercmp.lm.load import LoadedModel
from steercmp.lm.prompts import tokenize_prompt
from steercmp.plugin_manager import DEFAULT_PLUGINS, build_plugin_manager
from steercmp.run.proposals import ProposalContract, ProposalError, check_proposals
from steercmp.score.forms import family_forms
from steercmp.score.full_forward import ScoreRow, score_rows
from steercmp.testing.memory_runtime import ConformanceError, TestRuntime
from steercmp.testing.models import tiny_battery, tiny_contexts, tiny_experiment, tiny_lm


def _fail(check: str, message: str) -> ConformanceError:
    return ConformanceError(check, message)


# ---------------------------------------------------------------------------- setup
@attrs.frozen
class KitSetup:
    """What a check runs on: the ``battery`` (default: the kit's :data:`TINY_BATTERY`; a mapping
    is validated like a battery YAML), the model ``lm`` (default: :func:`tiny_lm` over that
    battery), the injection ``layer``, the run ``seed`` and whether prompts are read through the
    chat template (the instruction-model form)."""

    battery: Battery | Mapping[str, Any] | None = None
    lm: LoadedModel | None = None
    layer: int = 2
    seed: int = 0
    chat_template: bool = False

    def resolve(self) -> tuple[Battery, LoadedModel]:
        """The battery and the model, defaults filled in."""
        battery = self.battery
        if isinstance(battery, Mapping):
            battery = tiny_battery(battery)
        battery = battery or tiny_battery()
        return battery, self.lm or tiny_lm(battery)


# ---------------------------------------------------------------------------- reports
@attrs.define
class MethodReport:
    """What :func:`check_method` saw, for further assertions in a plugin's own tests."""

    name: str
    method: Method
    contexts: list[PromptContext]
    proposals: list[Proposal]
    runtime: TestRuntime
    masses: dict[str, dict[str, torch.Tensor]]  # scaling -> family -> [rows]
    checks: list[str]

    def proposal(self, prompt_id: str, family: str) -> Proposal:
        return next(p for p in self.proposals if p.prompt_id == prompt_id and p.family == family)


# ---------------------------------------------------------------------------- registration
def _hook_plugin(cls: type, hook: str, plugin: Any | None) -> Any | None:
    """The module that registers ``cls``: the given plugin, or the nearest module up its package path."""
    if plugin is not None:
        return plugin
    parts = cls.__module__.split(".")
    for i in range(len(parts), 0, -1):
        mod = sys.modules.get(".".join(parts[:i])) or importlib.import_module(".".join(parts[:i]))
        if callable(getattr(mod, hook, None)):
            return mod
    return None


def _check_registration(cls: type, kind: str, plugin: Any | None) -> list[str]:

    hook = f"register_{kind}s"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise _fail("registers", f"{cls.__name__} has no `name` class attribute")
    module = _hook_plugin(cls, hook, plugin)
    if module is None:
        raise _fail("registers", f"no module on {cls.__module__!r}'s package path implements {hook}; "
                                 f"add `@hookimpl def {hook}(register): register({cls.__name__})` "
                                 "or pass plugin=<module>")
    try:
        ps = build_plugin_manager(builtins=(), entry_points=False, extra=[module])
    except PluginError as exc:
        raise _fail("registers", f"loading {getattr(module, '__name__', module)!r} failed: {exc}") from exc
    found = ps.methods if kind == "method" else ps.controls
    if name not in found or found[name].cls is not cls:
        raise _fail("registers", f"{hook} of {getattr(module, '__name__', module)!r} does not register "
                                 f"{cls.__name__} under {name!r} (got {sorted(found)})")
    # unique name: no built-in (other than this very class) claims it
    for builtin in DEFAULT_PLUGINS:
        try:
            mod = importlib.import_module(builtin)
        except ImportError:
            continue
        if mod is module:
            continue
        try:
            other = build_plugin_manager(builtins=(), entry_points=False, extra=[mod])
        except PluginError:
            continue
        theirs = other.methods if kind == "method" else other.controls
        if name in theirs and theirs[name].cls is not cls:
            raise _fail("registers", f"{kind} name {name!r} is already taken by built-in {builtin!r}; "
                                     "choose another name")
    return ["registers"]


# ---------------------------------------------------------------------------- method checks
def _check_resources(method: Method) -> list[Resource]:
    res = list(method.resources())
    names = set()
    for r in res:
        if not isinstance(r, Resource):
            raise _fail("resources", f"resources() returned {r!r}, not a steercmp.api.Resource")
        if not callable(r.loader):
            raise _fail("resources", f"resource {r.name!r} has a loader that is not callable")
        if not r.name or r.name in names:
            raise _fail("resources", f"resource names must be non-empty and distinct (got {r.name!r} twice)")
        if r.params is not None and (not isinstance(r.params, int) or r.params < 0):
            raise _fail("resources", f"resource {r.name!r} params must be a non-negative int or None")
        names.add(r.name)
    return res


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, sort_keys=True)
        return True
    except (TypeError, ValueError):
        return False


def _check_proposals(method: Method, contexts: Sequence[PromptContext], proposals: Any,
                     families: Sequence[str], lm: LoadedModel, chat_template: bool,
                     allow_zero: bool) -> list[Proposal]:
    """The runner's own :func:`steercmp.run.proposals.check_proposals`, reported as a kit check."""
    try:
        contract = ProposalContract(scalings=SCALINGS, intervention=method.intervention, families=tuple(families),
                                    chat_template=chat_template, zero_ok=allow_zero)
        return check_proposals(method.name, proposals, contexts, contract, tokenizer=lm.tokenizer)
    except ProposalError as exc:
        raise _fail(exc.check, exc.one_line()) from None


def _signature(proposals: Sequence[Proposal]) -> dict[tuple[str, str], Any]:
    return {(p.prompt_id, p.family): (p.status, p.position, p.prompt_text,
                                      None if p.delta is None else p.delta.detach().float().clone())
            for p in proposals}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _score(method: Method, contexts: Sequence[PromptContext], proposals: Sequence[Proposal],
           lm: LoadedModel, layer: int, chat_template: bool, scalings: Sequence[str]
           ) -> dict[str, dict[str, torch.Tensor]]:
    """Score every live proposal at alpha 1 through the shared reference scorer."""
    by_key = {(p.prompt_id, p.family): p for p in proposals}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for scaling in scalings:
        rows: list[ScoreRow] = []
        for ctx in contexts:
            forms = family_forms(lm.tokenizer, ctx.prompt.families)
            for fam in PROPOSAL_FAMILIES:
                p = by_key.get((ctx.prompt.id, fam))
                if p is None or p.status == "dropped":
                    continue
                if p.prompt_text is not None:
                    tok = tokenize_prompt(lm.tokenizer, ctx.prompt, chat_template, text=p.prompt_text)
                    rows.append(ScoreRow(tok.ids, tok.score_pos, forms, torch.zeros(ctx.d_model), 0.0,
                                         tok.inject_pos, "raw"))
                else:
                    assert p.delta is not None
                    pos = p.position if p.position is not None else ctx.inject_pos
                    rows.append(ScoreRow(ctx.input_ids, ctx.score_pos, forms, p.delta.float(), 1.0, pos, scaling))
        if not rows:
            raise _fail("engine", f"{method.name} dropped every proposal; nothing to score")
        masses = score_rows(lm, layer, rows, batch_size=8)
        for fam, vals in masses.items():
            if not bool(torch.isfinite(vals).all()):
                raise _fail("engine", f"{method.name} under {scaling}: non-finite {fam} log-mass")
        out[scaling] = masses
    return out


def check_method(
    method_cls: type[Method],
    *,
    options: Mapping[str, Any] | None = None,
    families: Sequence[str] = PROPOSAL_FAMILIES,
    plugin: Any | None = None,
    setup: KitSetup = KitSetup(),
    scalings: Sequence[str] = SCALINGS,
    allow_zero: bool = False,
    distinct_families: bool = True,
) -> MethodReport:
    """Run every conformance check on ``method_cls``; return what was seen, raise on failure.

    ``options`` are the method's options (as under ``methods[].options`` in an experiment);
    ``plugin`` is the module whose ``register_methods`` registers the class (default: the nearest
    module up the class's package path that implements it); ``setup`` (:class:`KitSetup`) replaces
    the kit's battery, tiny model, layer or seed, or checks the instruction-model form.
    ``allow_zero`` accepts zero-norm deltas (only sensible for ``scalings=("raw",)``);
    ``distinct_families=False`` skips the check that ``edited`` and ``unrelated`` proposals differ.
    A method's :attr:`~steercmp.api.Method.companion_families` are checked like the others.
    """
    if not (isinstance(method_cls, type) and issubclass(method_cls, Method)):
        raise _fail("registers", f"{method_cls!r} is not a steercmp.api.Method subclass")
    checks = _check_registration(method_cls, "method", plugin)
    if method_cls.intervention not in ("activation", "prompt"):
        raise _fail("registers", f"intervention {method_cls.intervention!r} must be 'activation' or 'prompt'")

    battery, lm = setup.resolve()
    layer, seed, chat_template = setup.layer, setup.seed, setup.chat_template
    experiment = tiny_experiment(method_cls.name, options, layer=layer, seed=seed,
                                 chat_template=chat_template, battery=battery)
    contexts = tiny_contexts(lm, battery, layer, chat_template)
    originals = [c.resid.clone() for c in contexts]

    def make() -> Method:
        m = method_cls(dict(options or {}), experiment.run_settings(method_cls.name))
        m.validate()
        return m

    method = make()
    resources = _check_resources(method)
    checks.append("resources")

    hooks_before = _attached(lm)
    runtime = TestRuntime(lm, seed=seed, layer=layer, method_key=method_cls.name, chat_template=chat_template)
    families = (*families, *[f for f in method_cls.companion_families if f not in families])
    proposals = _check_proposals(method, contexts, method.propose(contexts, runtime), families, lm,
                                 chat_template, allow_zero)
    checks += ["proposals", "shape", "dtype", "finite", "families"]
    _check_untouched(method_cls.name, lm, hooks_before, contexts, originals)
    checks.append("hooks")
    declared = {r.name for r in resources}
    undeclared = [n for n in runtime.loaded if n not in declared]
    if undeclared:
        raise _fail("resources", f"{method_cls.name} loaded {undeclared} without declaring them in resources()")

    if distinct_families and set(PROPOSAL_FAMILIES) <= set(families):
        _check_distinct(method_cls.name, contexts, proposals)
        checks.append("distinct_families")

    again = TestRuntime(lm, seed=seed, layer=layer, method_key=method_cls.name, chat_template=chat_template)
    _check_deterministic(method_cls.name, proposals, list(make().propose(contexts, again)))
    checks.append("deterministic")

    masses = _score(method, contexts, proposals, lm, layer, chat_template, scalings)
    if _attached(lm) != hooks_before:
        raise _fail("hooks", "hooks left behind after scoring")
    checks.append("engine")
    return MethodReport(name=method_cls.name, method=method, contexts=contexts, proposals=proposals,
                        runtime=runtime, masses=masses, checks=checks)


def _check_untouched(name: str, lm: LoadedModel, hooks_before: int, contexts: Sequence[Any],
                     originals: Sequence[torch.Tensor]) -> None:
    """propose() left no hook on the model and every residual as it was."""
    if _attached(lm) != hooks_before:
        raise _fail("hooks", f"{name}.propose() left {_attached(lm) - hooks_before} hook(s) "
                             "on the base model; attach hooks inside context managers that remove them")
    for ctx, before in zip(contexts, originals, strict=True):
        if not torch.equal(ctx.resid, before):
            raise _fail("hooks", f"{name}.propose() modified the residual of {ctx.prompt.id!r}; "
                                 "clone before editing")


def _check_distinct(name: str, contexts: Sequence[Any], proposals: Sequence[Proposal]) -> None:
    """The family must change the proposal: 'edited' and 'unrelated' may not agree on every live prompt."""
    sig = _signature(proposals)
    live = [c.prompt.id for c in contexts if all(sig[(c.prompt.id, f)][0] != "dropped" for f in PROPOSAL_FAMILIES)]
    if live and all(_same(sig[(pid, "edited")][2], sig[(pid, "unrelated")][2])
                    and _same(sig[(pid, "edited")][3], sig[(pid, "unrelated")][3]) for pid in live):
        raise _fail("families", f"{name} proposes the same thing for 'edited' and "
                                "'unrelated' on every prompt; the family must change the proposal")


def _check_deterministic(name: str, proposals: Sequence[Proposal], second: Sequence[Proposal]) -> None:
    """A second run with the same seed proposes exactly the same."""
    first_sig, second_sig = _signature(proposals), _signature(second)
    if set(first_sig) != set(second_sig) or not all(
            all(_same(x, y) for x, y in zip(first_sig[k], second_sig[k], strict=True)) for k in first_sig):
        diff = next((k for k in first_sig if k not in second_sig or not all(
            _same(x, y) for x, y in zip(first_sig[k], second_sig[k], strict=True))), None)
        raise _fail("deterministic", f"{name} proposed differently on a second run with the same "
                                     f"seed (first difference at {diff}); draw randomness from "
                                     "runtime.generator(...) only")


def _attached(lm: LoadedModel) -> int:
    return attached_hooks(lm.model)


# ---------------------------------------------------------------------------- control checks
class _FakeMethod(Method):
    name = "conformance_fake"

    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime) -> Sequence[Proposal]:
        return []


def check_control(
    control_cls: type[Control],
    *,
    options: Mapping[str, Any] | None = None,
    plugin: Any | None = None,
    setup: KitSetup = KitSetup(),
    scalings: Sequence[str] = SCALINGS,
) -> list[Proposal]:
    """Run the conformance checks on a control; return the proposals it derived.

    Checks: registration under a unique name; ``applies_to`` answers a bool for activation and
    prompt methods; for activation methods ``derive`` returns a finite float32 ``[d_model]``
    delta (or a prompt text) for the same prompt and family, deterministically for the same
    generator seed, without touching the target proposal; and the result scores through the
    shared engine under both scalings.
    """
    if not (isinstance(control_cls, type) and issubclass(control_cls, Control)):
        raise _fail("registers", f"{control_cls!r} is not a steercmp.api.Control subclass")
    _check_registration(control_cls, "control", plugin)
    control = control_cls(dict(options or {}))
    battery, lm = setup.resolve()
    layer, seed = setup.layer, setup.seed
    exp = tiny_experiment(layer=layer, seed=seed, battery=battery)
    act = type("ActivationFake", (_FakeMethod,), {"intervention": "activation"})({}, exp.run_settings("fake"))
    prm = type("PromptFake", (_FakeMethod,), {"intervention": "prompt"})({}, exp.run_settings("fake"))
    for m in (act, prm):
        if not isinstance(control.applies_to(m), bool):
            raise _fail("applies_to", f"{control_cls.name}.applies_to must return a bool")
    contexts = tiny_contexts(lm, battery, layer)
    hooks_before = _attached(lm)
    derived: list[Proposal] = []
    if control.applies_to(act):
        for ctx in contexts:
            g = torch.Generator().manual_seed(7)
            target = Proposal(prompt_id=ctx.prompt.id, family="edited",
                              delta=torch.randn(ctx.d_model, generator=g), status="ok")
            kept = target.delta.clone()  # type: ignore[union-attr]
            results = []
            for _ in range(2):
                gen = make_generator(seed, "conformance", ctx.prompt.id, control_cls.name)
                results.append(control.derive(target, ctx, gen))
            p = results[0]
            where = f"{control_cls.name} {ctx.prompt.id}"
            if not isinstance(p, Proposal):
                raise _fail("proposals", f"{where}: derive returned {type(p).__name__}, not a Proposal")
            if (p.prompt_id, p.family) != (target.prompt_id, target.family):
                raise _fail("proposals", f"{where}: derive must keep the target's prompt_id and family")
            if not torch.equal(target.delta, kept):  # type: ignore[arg-type]
                raise _fail("proposals", f"{where}: derive modified the target proposal's delta in place")
            if not _json_ok(dict(p.meta)):
                raise _fail("proposals", f"{where}: meta is not JSON-serialisable")
            if p.delta is not None:
                if tuple(p.delta.shape) != (ctx.d_model,) or p.delta.dtype != torch.float32:
                    raise _fail("shape", f"{where}: delta {tuple(p.delta.shape)} {p.delta.dtype}, "
                                         f"expected ({ctx.d_model},) float32")
                if not bool(torch.isfinite(p.delta).all()):
                    raise _fail("finite", f"{where}: delta contains NaN or inf")
            if not all(_same(a, b) for a, b in zip(_signature([p])[(p.prompt_id, p.family)],
                                                    _signature([results[1]])[(p.prompt_id, p.family)],
                                                    strict=True)):
                raise _fail("deterministic", f"{where}: derive differs for the same generator seed")
            derived.append(p)
        _score(act, contexts, [attrs.evolve(p, family=f) for p in derived for f in PROPOSAL_FAMILIES],
               lm, layer, False, [s for s in scalings if s == "raw" or all(
                   q.delta is None or float(q.delta.norm()) > 0 for q in derived)])
    if _attached(lm) != hooks_before:
        raise _fail("hooks", f"{control_cls.name} left hooks on the model")
    return derived
