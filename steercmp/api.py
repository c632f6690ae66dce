"""The types a plugin sees: what a method receives, what it returns, what it declares.

A method never touches injection or scoring. It receives one :class:`PromptContext` per prompt
(the prompt, its token ids, positions and the captured residual stream at the experiment's layer),
and returns :class:`Proposal` objects: a delta for the shared engine (or, for prompting
baselines, a replacement prompt text). Controls derive their conditions from the method's
target proposal. The runner owns models, batching, scoring and artifacts.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, ClassVar, Literal

import attrs
import torch

Family = Literal["original", "edited", "unrelated"]
#: The families a method proposes toward: ``edited`` is the target condition,
#: ``unrelated`` is the ``unrelated_edit`` control.
PROPOSAL_FAMILIES: tuple[str, ...] = ("edited", "unrelated")
TARGET_CONDITION = "target_edit"
UNRELATED_CONDITION = "unrelated_edit"
FAMILY_OF_CONDITION = {TARGET_CONDITION: "edited", UNRELATED_CONDITION: "unrelated"}
#: Companion families a text-edit method proposes besides :data:`PROPOSAL_FAMILIES` (see
#: :attr:`Method.companion_families`): ``paraphrase`` (a meaning-preserving rewording of the
#: explanation, through the reconstructor) and ``round_trip`` (the activation replaced by the
#: reconstruction of its own explanation). Controls with a :attr:`Control.companion` read them.
COMPANION_FAMILIES: tuple[str, ...] = ("paraphrase", "round_trip")
SCALINGS: tuple[str, ...] = ("raw", "norm_relative")
#: how a control enters the matched-dose verdict (:attr:`Control.matching`)
CONTROL_MATCHING: tuple[str, ...] = ("per_method", "shared", "baseline", "descriptive")
#: statuses a proposal may carry: ``ok``; NLA selection outcomes ``editable`` / ``fallback``;
#: ``below_fidelity`` (under the method's fidelity gate: reported apart like fallback);
#: ``dropped`` (excluded from the analysis, visibly)
PROPOSAL_STATUSES: tuple[str, ...] = ("ok", "editable", "fallback", "below_fidelity", "dropped")


def _frozen_dict(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


@attrs.frozen
class Prompt:
    """One battery prompt: a couplet whose first line ends where the rhyme plan forms.

    ``families`` maps ``original`` / ``edited`` / ``unrelated`` to word lists; ``edits`` maps the
    same target families to explanation edit maps (e.g. ``{"edited": {"dream": "gleam"}}``).
    ``inject`` and ``score`` are position rules (see :data:`steercmp.battery.RULE_KINDS`).
    """

    id: str
    text: str
    families: Mapping[str, tuple[str, ...]]
    edits: Mapping[str, Mapping[str, str]] = attrs.field(factory=dict)
    inject: str = "first_line_break"
    score: str = "last"
    rhyme: str = ""
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)

    @property
    def line_end_word(self) -> str:
        """The word that ends the first line (the word the second line must rhyme with)."""
        first = self.text.split("\n", 1)[0]
        words = [w.strip(".,;:!?\"'()") for w in first.split()]
        return words[-1].lower() if words else ""


@attrs.frozen(eq=False)
class PromptContext:
    """Everything a method may read about one prompt, captured once from the base model.

    ``resid`` is the residual stream at the OUTPUT of block ``layer`` (``hidden_states[layer+1]``)
    for every position, float32 on CPU, shape ``[seq, d_model]``.
    """

    prompt: Prompt
    input_ids: tuple[int, ...]
    inject_pos: int
    score_pos: int
    layer: int
    resid: torch.Tensor

    @property
    def activation(self) -> torch.Tensor:
        """The residual vector at the injection (planning) position, ``[d_model]``."""
        return self.resid[self.inject_pos]

    @property
    def d_model(self) -> int:
        return int(self.resid.shape[-1])


@attrs.frozen(eq=False)
class Proposal:
    """A method's proposed intervention for one prompt and one target family.

    Exactly one of ``delta`` (an activation edit, ``[d_model]``) or ``prompt_text`` (a prompting
    baseline's replacement text) is set. ``position`` is an absolute token index into the prompt
    (``None`` = the prompt's injection position). ``status`` records selection outcomes such as
    NLA's ``editable`` / ``fallback`` / ``dropped``; a ``dropped`` proposal is excluded from the
    analysis visibly (its cells are written with ``status=dropped`` and no score).
    ``fixed_alpha`` makes the condition one operation rather than a dose: every alpha cell injects
    the raw delta at this alpha (the round trip replaces the activation once, at 1).
    ``meta`` must be JSON-serialisable: it is stored with the cells.
    """

    prompt_id: str
    family: str
    delta: torch.Tensor | None = None
    position: int | None = None
    prompt_text: str | None = None
    status: str = "ok"
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_dict)
    fixed_alpha: float | None = None

    def __attrs_post_init__(self) -> None:
        if (self.delta is None) == (self.prompt_text is None) and self.status != "dropped":
            raise ValueError(
                f"proposal for {self.prompt_id}/{self.family}: set exactly one of delta or prompt_text"
            )

    @property
    def delta_norm(self) -> float:
        return float(self.delta.float().norm()) if self.delta is not None else 0.0


@attrs.frozen
class Resource:
    """A model or other heavy object a method needs, loaded by the runner one at a time.

    ``loader`` builds the object; the runner unloads whatever else is resident first and logs
    memory per stage. ``params`` (parameter count) and ``bytes_per_param`` feed ``steercmp plan``'s
    peak-memory estimate without downloading anything. ``origin``, when given, returns one line
    saying where the artefact will come from (a local directory, the Hugging Face cache, the hub,
    a build on first use) without loading it, and raises :class:`steercmp.errors.ConfigError` when
    it cannot be had (e.g. not cached while ``HF_HUB_OFFLINE`` is set): ``steercmp plan`` prints it.
    """

    name: str
    kind: str
    source: str
    loader: Callable[[], Any] = attrs.field(eq=False, repr=False)
    params: int | None = None
    bytes_per_param: float = 4.0
    note: str = ""
    origin: Callable[[], str] | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def estimated_bytes(self) -> int | None:
        return None if self.params is None else int(self.params * self.bytes_per_param)


class MethodRuntime(abc.ABC):
    """What the runner lends a method while it proposes: staged loading, captures, seeds, I/O.

    Attributes: ``seed`` (the run seed), ``layer`` (the experiment's layer: the output of block
    ``layer``), ``device`` and ``dtype`` (the base model's), ``run_dir`` (the run directory, or
    ``None`` in tests). A method never registers hooks itself: :meth:`capture` reads activations
    of any text, and the shared engine injects whatever the method proposes.
    """

    seed: int
    layer: int
    device: str
    dtype: torch.dtype
    run_dir: Any  # pathlib.Path of the run directory, or None

    @abc.abstractmethod
    def load(self, resource: Resource) -> AbstractContextManager[Any]:
        """Make ``resource`` the one resident model (unloading any other) and yield it."""

    @abc.abstractmethod
    def base(self) -> AbstractContextManager[Any]:
        """Yield the base model as a :class:`steercmp.lm.load.LoadedModel` (loading it if needed)."""

    @abc.abstractmethod
    def capture(self, inputs: Sequence[str | Sequence[int]], positions: Sequence[int | str] | None = None,
                *, layer: int | None = None, batch_size: int = 8) -> list[torch.Tensor]:
        """Residual stream of the base model at the output of block ``layer`` (default: the
        experiment's) for each input, float32 on CPU.

        An input is a text (tokenized like a battery prompt: BOS, or the chat prefix when the
        experiment uses one) or a sequence of token ids. Without ``positions`` each result is
        ``[len, d_model]``; with one position per input (an absolute index, negative from the end,
        or a position rule such as ``"first_line_break"`` for texts) each result is ``[d_model]``,
        and inputs that share a prefix run it once (the values up to the dtype's rounding).
        """

    @abc.abstractmethod
    def generator(self, *key: object, shared: bool = False) -> torch.Generator:
        """A CPU generator seeded from the run seed, the method's label and ``key`` (never from
        call order). ``shared``: from the run seed and ``key`` alone, so two configured variants
        of one method that ask with the same key draw the same stream (a paired comparison)."""

    @abc.abstractmethod
    def progress(self, iterable: Any, desc: str, total: int | None = None) -> Iterator[Any]:
        """Wrap long work in a progress bar."""

    @abc.abstractmethod
    def write_table(self, name: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Store a method-specific table (e.g. NLA explanations) as ``<run>/<method>/<name>.parquet``."""

    @abc.abstractmethod
    def cached(self, name: str, key: Mapping[str, Any], compute: Callable[[], Any], *,
               shared: bool = False) -> Any:
        """Return ``compute()``, reusing a stored result keyed by ``name`` and ``key`` when present.
        ``shared``: stored for the whole run, so any method asking with the same name and key (a
        second variant of the same method) reuses it; the key must then name everything the value
        depends on. ``--fresh`` recomputes a stored value once per run, not once per method."""


@attrs.frozen
class RunSettings:
    """What a method knows of the run it is part of, frozen: built by the runner from the
    experiment (:meth:`steercmp.config.Experiment.run_settings`). ``label`` is the method's key
    in this run (its ``label``, else its name: error messages name ``methods.<label>.options``);
    ``inject`` and ``score`` are the position rules every prompt of the battery shares (the
    experiment's ``inject`` sets them), ``None`` when prompts differ; ``model_dtype`` and
    ``model_device`` are as configured (``auto`` included)."""

    label: str = ""
    layer: int | None = None
    model_id: str = ""
    model_dtype: str = "float32"
    model_device: str = "cpu"
    chat_template: bool = False
    inject: str | None = None
    score: str | None = None
    seed: int = 0
    battery_source: str = "battery"


class Method(abc.ABC):
    """A steering method. Subclasses set ``name`` and implement :meth:`propose`.

    ``intervention`` is ``"activation"`` (proposals carry deltas injected by the shared engine) or
    ``"prompt"`` (proposals carry replacement prompt text; activation-only controls such as
    ``wrong_position`` are then marked not applicable).
    """

    name: ClassVar[str]
    intervention: ClassVar[str] = "activation"
    description: ClassVar[str] = ""
    #: families proposed besides :data:`PROPOSAL_FAMILIES`: a text-edit method sets
    #: :data:`COMPANION_FAMILIES`, and the controls that read them then apply to it
    companion_families: ClassVar[tuple[str, ...]] = ()

    def __init__(self, options: Mapping[str, Any], settings: RunSettings | None = None):
        self.options = dict(options)
        self.settings = settings if settings is not None else RunSettings()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check options before any model loads; raise :class:`steercmp.errors.ConfigError`."""

    def resources(self) -> Sequence[Resource]:
        """Models or objects this method loads (besides the base model), in stage order."""
        return ()

    def pending_build(self) -> str | None:
        """What this method must build before it can propose (minutes of training on first use,
        e.g. ``"the mini NLA pair"``), or ``None`` when everything it needs is at hand. The
        runner proposes, scores and reports the methods with nothing to build first (a partial
        report), then builds and adds these. Must not load or build anything itself."""
        return None

    @abc.abstractmethod
    def propose(
        self, contexts: Sequence[PromptContext], runtime: MethodRuntime
    ) -> Sequence[Proposal]:
        """Return one proposal per prompt and per family in :data:`PROPOSAL_FAMILIES` and
        :attr:`companion_families`."""


class Control(abc.ABC):
    """A control condition derived from a method's target proposal (never from its own idea).

    A control with a ``companion`` family derives from the method's proposal of that family
    instead of the target, and applies only to methods that propose it
    (:attr:`Method.companion_families`): how text-edit controls reach every text-edit plugin.

    ``matching`` says how the matched-dose verdict uses the control (docs/statistics.md):
    ``per_method`` (derived from the method's proposal and dose-matched like the target, the
    default), ``shared`` (a direction that does not depend on the method: K draws per prompt
    from :meth:`derive_shared`, dose-matched to the budget once and compared with every method
    through their mean), ``baseline`` (the unsteered model: no-op) or ``descriptive`` (reported,
    never in a verdict).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    companion: ClassVar[str | None] = None
    matching: ClassVar[str] = "per_method"

    def __init__(self, options: Mapping[str, Any]):
        self.options = dict(options)

    def applies_to(self, method: Method) -> bool:
        """Whether this control makes sense for ``method``; if not, its cells say ``not_applicable``."""
        return self.companion is None or self.companion in method.companion_families

    @abc.abstractmethod
    def derive(
        self, target: Proposal, context: PromptContext, generator: torch.Generator
    ) -> Proposal:
        """Build the control's proposal from the target proposal for the same prompt (or from the
        method's ``companion`` proposal, for a companion control)."""

    def derive_shared(self, context: PromptContext, others: Sequence[PromptContext], generator: torch.Generator,
                      draw: int) -> Proposal:
        """A ``shared`` control's draw ``draw`` for one prompt: a direction whose norm does not
        matter (it is dose-matched), built from the prompt, the run's other prompts and a
        generator seeded by (run seed, control, prompt, draw)."""
        raise NotImplementedError(f"control {self.name!r} has matching={self.matching!r} but no derive_shared")


@attrs.frozen
class SectionContent:
    """What a report section shows: an Altair chart (or ``None``), tables as
    ``(subheading, polars.DataFrame)`` pairs, and a one-paragraph note."""

    chart: Any = None
    tables: Sequence[tuple[str, Any]] = ()
    note: str = ""


@attrs.frozen(eq=False)
class ReportInputs:
    """What a report section may read about a finished run.

    ``cells`` and ``completions`` are the run's polars frames (``completions`` may be ``None``);
    :meth:`method_tables` returns ``{method: DataFrame}`` for the tables methods wrote with
    :meth:`MethodRuntime.write_table`.
    """

    run_dir: Any
    cells: Any
    completions: Any
    decision_alphas: tuple[float, ...]
    seed: int
    read_tables: Callable[[str], Mapping[str, Any]] = attrs.field(repr=False)

    def method_tables(self, name: str) -> Mapping[str, Any]:
        return self.read_tables(name)


@attrs.frozen
class ReportSection:
    """A section a plugin adds to every report. ``build`` returns its content, or ``None`` when
    the run has nothing for it (the report then says "not available" with ``missing``)."""

    name: str
    title: str
    build: Callable[[ReportInputs], SectionContent | None] = attrs.field(repr=False)
    missing: str = "not produced by this run"


# ----------------------------------------------------------------------------- the helpers
def progress_bar(iterable: Any = None, *, enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar for builders and stages. ``enabled=False`` hides it; otherwise ``disable`` is
    left to tqdm's default, so ``steercmp run --no-progress`` (which sets ``TQDM_DISABLE``)
    silences every bar, a plugin's build included. (Passing ``disable=not enabled`` would
    override that environment default.)"""
    from tqdm.auto import tqdm

    return tqdm(iterable, **options) if enabled else tqdm(iterable, disable=True, **options)


#: Everything else a plugin may use, re-exported here so ``plugins/`` and third-party plugins
#: import one namespace (``steercmp.api``) besides ``steercmp.hookspecs``; a meta-test keeps
#: them to it. They load on first use (PEP 562): the core imports the types above from this
#: module, and an eager import of ``steercmp.lm`` here would make the layers circular.
HELPERS: dict[str, str] = {
    **dict.fromkeys(("ConfigError", "NumericalError", "PluginError", "SteercmpError"), "steercmp.errors"),
    **dict.fromkeys(("EMBEDDED_ID", "is_embedded", "known_model", "nla_pair"), "steercmp.catalog"),
    **dict.fromkeys(("LoadedModel", "load_base_model", "parse_dtype", "release", "resolve_device", "text_config"),
                    "steercmp.lm.load"),
    **dict.fromkeys(("capture_at", "capture_embeds", "capture_residuals", "capture_tokens"), "steercmp.lm.capture"),
    **dict.fromkeys(("encode_form", "pad_batch", "resolve_rule", "tokenize_text", "word_forms"), "steercmp.lm.prompts"),
    **dict.fromkeys(("final_norm_gain", "readout_directions"), "steercmp.lm.readout"),
    **dict.fromkeys(("last_block_at", "top_blocks_only", "truncate_blocks"), "steercmp.lm.blocks"),
    "sample_tokens": "steercmp.lm.sampling",
    "in_fresh_process": "steercmp.lm.build_process",
    "resolve_dtype_name": "steercmp.lm.device",
    **dict.fromkeys(("cache_kwargs", "output_cache"), "steercmp.lm.compat"),
    **dict.fromkeys(("CONSTRUCTIONS", "swap_line_end"), "steercmp.couplets"),
    **dict.fromkeys(("NoCounterfactual", "build_counterfactual"), "steercmp.lm.couplet_counterfactual"),
    **dict.fromkeys(("cache_root", "embedded_dir"), "steercmp.lm.embedded"),
    **dict.fromkeys(("cached_hub_file", "hub_offline", "hub_origin", "model_origin"), "steercmp.lm.origin"),
    **dict.fromkeys(("FIRST_LINE_TEMPLATES", "general_sentences", "make_couplets", "rhyme_group", "rhyme_part",
                     "single_token_filter"), "steercmp.rhymes"),
    "experiments_dir": "steercmp.battery_files",
    **dict.fromkeys(("build_lock", "writable_file"), "steercmp.paths"),
}
#: whole modules re-exported as they are
HELPER_MODULES = {"rhymes": "steercmp.rhymes"}


def __getattr__(name: str) -> Any:
    import importlib

    if name in HELPER_MODULES:
        return importlib.import_module(HELPER_MODULES[name])
    if name in HELPERS:
        return getattr(importlib.import_module(HELPERS[name]), name)
    raise AttributeError(f"module 'steercmp.api' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *HELPERS, *HELPER_MODULES])
