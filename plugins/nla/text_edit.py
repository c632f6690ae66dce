"""``nla_text_edit``: explain the planning activation, edit the explanation, inject the difference.

Per prompt: the AV writes ``n_explanations`` explanations of the activation at the planning
position; the AR reconstructs each (fidelity against the prompt's own activation; the fve
baseline is a dataset-level variance, :mod:`.baseline`); one explanation is selected
(``strict`` / ``default``, see :mod:`.select`); the prompt's edit maps are applied toward the
``edited`` family (target) and the ``unrelated`` family (control), and the proposal's delta is
``AR(edited text) - AR(original text)``.

It also proposes the two companion families every text-edit method offers its controls
(:data:`steercmp.api.COMPANION_FAMILIES`): ``paraphrase`` = ``AR(reworded text) - AR(original
text)`` (a meaning-preserving rewording, :mod:`.paraphrase`) and ``round_trip`` = the
reconstruction of the original explanation rescaled to the activation's norm, minus the
activation (applied once, at alpha 1). ``fidelity_gate`` moves prompts whose selected
explanation reconstructs below the gate out of the primary analysis (``below_fidelity``).

Nothing is fabricated: when no explanation names an editable term, ``strict`` (the default)
drops the prompt, and ``default`` keeps it as a ``fallback`` prompt with a zero delta (there was
nothing to edit), reported apart and never in the primary analysis.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from steercmp.api import (
    COMPANION_FAMILIES,
    EMBEDDED_ID,
    PROPOSAL_FAMILIES,
    ConfigError,
    Method,
    MethodRuntime,
    PromptContext,
    Proposal,
    Resource,
    known_model,
    model_origin,
    nla_pair,
    parse_dtype,
    resolve_device,
)

from .baseline import dataset_baseline
from .editing import SELECTIONS, apply_edit, mentions, select_explanation, spelled_ending
from .fidelity import fidelity
from .paraphrase import DEFAULT_RULES, paraphrase, parse_rules

#: the miniature pair steercmp builds for the embedded Gemma 3 270M (:mod:`.mini`)
MINI_ALIAS = "mini"
MINI_PAIR = (EMBEDDED_ID, 12)


def checkpoint_source(source: str, role: str, *, progress: bool = True, position: str = "first_line_break") -> str:
    """The checkpoint to load for ``source``: ``mini`` builds (once) or reuses the miniature
    pair read at ``position`` and names its directory; anything else passes through to the loader."""
    if source != MINI_ALIAS:
        return source
    from .mini import ensure_mini_pair

    av, ar = ensure_mini_pair(progress=progress, position=position)
    return str(av if role == "av" else ar)


def checkpoint_origin(source: str, role: str, position: str) -> str:
    """Where an AV/AR checkpoint comes from, without loading it (``steercmp plan``)."""
    if source == MINI_ALIAS:
        from .mini import BUILD_ESTIMATE, is_built, mini_dir

        root = mini_dir(position)
        return (f"steercmp cache ({root / role})" if is_built(root, position)
                else f"built on first use into the steercmp cache (the mini NLA pair, {BUILD_ESTIMATE})")
    return model_origin(source, where=f"methods.nla_text_edit.options.{role}")


def estimate_params(source: str, role: str) -> int | None:
    """Parameter count of an AV/AR without loading it (the model catalogue, or local safetensors
    sizes). An AR keeps blocks 0..K of its base plus a d x d value head."""
    pair = MINI_PAIR if source == MINI_ALIAS else nla_pair(source)
    info = known_model(pair[0]) if pair is not None else None
    if pair is not None and info is not None and info.params and info.layers and info.d_model:
        if role == "av":
            return int(info.params)
        return int(info.params * (pair[1] + 1) / info.layers + info.d_model ** 2)
    path = Path(source).expanduser()
    if path.is_dir():
        nbytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        if nbytes:
            try:
                cfg = json.loads((path / "config.json").read_text())
                dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
            except (OSError, ValueError):
                dt = "float32"
            return int(nbytes / (2 if "16" in dt else 4))
    return None


def edit_map_for(prompt: Any, family: str, *, cue: bool = False) -> dict[str, str]:
    """The prompt's explanation edit map toward ``family`` (or original[i] -> family[i]).

    With ``cue`` (the ``cue_edit`` option, off by default: it is ORACLE-ASSISTED), a rhyme-change
    prompt that names a cue word for ``family`` (``meta.cue``: the word line 1 of its
    counterfactual couplet ends in, the positive control's answer) also maps line 1's last word
    to the cue and its spelled rhyme ending to the cue's (``bat -> shell``, ``-at -> -ell``), so
    the text edit states the same counterfactual the positive control patches in. Its results
    are then labelled oracle-assisted in every table.
    """
    edits = dict(prompt.edits.get(family, {}) or {})
    if edits:
        out = {str(k): str(v) for k, v in edits.items()}
    else:
        original = list(prompt.families.get("original", ()))
        target = list(prompt.families.get(family, ()))
        out = dict(zip(original, target, strict=False))
    if not cue:
        return out
    word = ((getattr(prompt, "meta", None) or {}).get("cue") or {}).get(family)
    end = getattr(prompt, "line_end_word", "")
    if isinstance(word, str) and word and end and end.lower() != word.lower():
        out.setdefault(end, word)
        a, b = spelled_ending(end), spelled_ending(word)
        if a != b:
            out.setdefault(f"-{a}", f"-{b}")
    return out


def edit_texts(explanation: str, edit_map: Mapping[str, str]) -> tuple[str, str, str, int]:
    """``(original_text, edited_text, mode, replacements)`` for one explanation and edit map;
    mode ``none`` (and the text unchanged) when the explanation names no term of the map."""
    edited, count = apply_edit(explanation, edit_map)
    return explanation, edited, ("replaced" if count else "none"), count


@attrs.frozen
class NlaOptions:
    av: str
    ar: str
    n_explanations: int = 4
    temperature: float = 1.0
    max_new_tokens: int | None = None
    selection: str = "strict"
    dtype: str | None = None
    batch_size: int = 8
    greedy: bool = False
    fidelity_gate: float | None = None
    paraphrase_rules: tuple[tuple[str, str], ...] = DEFAULT_RULES
    cue_edit: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> NlaOptions:
        where = "methods.nla_text_edit"
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}", where=where,
                              fix=f"use only {sorted(known)}")
        for key in ("av", "ar"):
            if not isinstance(options.get(key), str) or not options.get(key):
                raise ConfigError(f"option {key!r} is required (HF id, local dir or 'mini')",
                                  where=f"{where}.{key}", fix=f"set {key}: mini for the embedded model")
        opts = dict(options)
        for key, typ, lo in (("n_explanations", int, 1), ("batch_size", int, 1),
                             ("max_new_tokens", int, 1)):
            if key in opts and opts[key] is not None:
                if isinstance(opts[key], bool) or not isinstance(opts[key], typ) or opts[key] < lo:
                    raise ConfigError(f"{key} must be an integer >= {lo}, got {opts[key]!r}",
                                      where=f"{where}.{key}", fix="correct the experiment YAML")
        temp = opts.get("temperature", 1.0)
        if isinstance(temp, bool) or not isinstance(temp, int | float) or temp <= 0:
            raise ConfigError(f"temperature must be > 0, got {temp!r}",
                              where=f"{where}.temperature", fix="use 1.0 (the paper) or set greedy")
        opts["temperature"] = float(temp)
        if opts.get("selection", "strict") not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {opts['selection']!r}",
                              where=f"{where}.selection", fix="use strict (drop prompts without an editable term) or default (keep them apart as fallback)")
        if opts.get("dtype") is not None:
            parse_dtype(opts["dtype"])
        gate = opts.get("fidelity_gate")
        if gate is not None:
            if isinstance(gate, bool) or not isinstance(gate, int | float) or gate != gate:
                raise ConfigError(f"fidelity_gate must be a number, got {gate!r}", where=f"{where}.fidelity_gate",
                                  fix="use e.g. 0.5 (the FVE the community found edits need), or leave it out")
            if gate > 1:
                raise ConfigError(f"fidelity_gate {gate} is above 1: fve_nrm never exceeds 1, so every prompt "
                                  "would be gated", where=f"{where}.fidelity_gate", fix="use a value <= 1, e.g. 0.5")
            opts["fidelity_gate"] = float(gate)
        if not isinstance(opts.get("cue_edit", False), bool):
            raise ConfigError(f"cue_edit must be true or false, got {opts['cue_edit']!r}", where=f"{where}.cue_edit",
                              fix="leave it out (the default, no oracle) or write true to label the method oracle-assisted")
        opts["paraphrase_rules"] = parse_rules(opts.get("paraphrase_rules"), f"{where}.paraphrase_rules")
        return cls(**opts)

    @property
    def new_tokens(self) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return 64 if self.av == MINI_ALIAS else 200


class NlaTextEdit(Method):
    """Natural Language Autoencoder text edit (AV explain -> edit -> AR difference)."""

    name = "nla_text_edit"
    intervention = "activation"
    companion_families = COMPANION_FAMILIES
    description = ("NLA text edit: explain the planning activation with the AV, edit the planning "
                   "words, inject AR(edited) - AR(original)")

    @property
    def opts(self) -> NlaOptions:
        return NlaOptions.from_options(self.options)

    def validate(self) -> None:
        from .mini.data import POSITIONS

        if self.opts.av == MINI_ALIAS and self._position() not in POSITIONS:
            raise ConfigError(f"the mini NLA pair is built for inject {' or '.join(POSITIONS)}, not "
                              f"{self._position()!r}", where=f"methods.{self.settings.label or self.name}.av",
                              fix="set the experiment's inject to first_line_break or last, or give a trained pair")

    def _position(self) -> str:
        """The position rule the activations are read at: the battery's common inject rule (the
        experiment's ``inject`` sets it for every prompt), else the first line break."""
        return self.settings.inject or "first_line_break"

    # -- where and how to load
    def _device(self) -> str:
        return resolve_device(self.settings.model_device)

    def _dtype(self) -> torch.dtype:
        if self.opts.dtype:
            return parse_dtype(self.opts.dtype, self._device())
        try:
            return parse_dtype(self.settings.model_dtype, self._device())
        except ConfigError:
            return torch.float32

    def _layer(self) -> int | None:
        return self.settings.layer

    def pending_build(self) -> str | None:
        from .mini import BUILD_ESTIMATE, is_built, mini_dir

        o = self.opts
        if MINI_ALIAS not in (o.av, o.ar) or is_built(mini_dir(self._position()), self._position()):
            return None
        return f"the mini NLA pair (built once and cached; {BUILD_ESTIMATE})"

    def resources(self) -> Sequence[Resource]:
        from .ar import ActivationReconstructor
        from .av import ActivationVerbalizer

        dtype, device, position = self._dtype(), self._device(), self._position()

        def checkpoint(role: str, source: str, cls: Any, note: str) -> Resource:
            return Resource(name=f"nla_{role}", kind=f"nla_{role}", source=source,
                            loader=lambda: cls.load(checkpoint_source(source, role, position=position),
                                                    dtype=dtype, device=device),
                            params=estimate_params(source, role), bytes_per_param=torch.finfo(dtype).bits / 8,
                            note=note, origin=lambda: checkpoint_origin(source, role, position))

        return (checkpoint("av", self.opts.av, ActivationVerbalizer, "activation verbalizer (explain)"),
                checkpoint("ar", self.opts.ar, ActivationReconstructor,
                           "activation reconstructor (truncated backbone + value head)"))

    # -- the method
    def propose(self, contexts: Sequence[PromptContext], runtime: MethodRuntime
                ) -> Sequence[Proposal]:
        """Explain (AV), choose and edit an explanation per prompt, reconstruct both texts (AR):
        the delta is AR(edited) - AR(original). Writes the explanations and selections tables."""
        o = self.opts
        if not contexts:
            return []
        av_res, ar_res = self.resources()
        layer, d_model = self._layer(), contexts[0].d_model
        acts = torch.stack([c.activation.float().cpu() for c in contexts])
        fve_base = dataset_baseline(runtime, self.settings.model_id, position=self._position())  # before the AV
        baseline = float(fve_base["value"])
        jobs = [(ci, s) for ci in range(len(contexts)) for s in range(o.n_explanations)]
        texts = self._explain(contexts, acts, jobs, runtime, av_res, d_model, layer)
        with runtime.load(ar_res) as ar:
            ar.meta.check_compatible(d_model=d_model, layer=layer)
            recon = ar.reconstruct([texts[k][0] for k in jobs])
            fid = {k: fidelity(recon[i], acts[k[0]], baseline) for i, k in enumerate(jobs)}
            expl_rows, chosen, plans = self._plan_edits(contexts, texts, fid)
            edit_inputs = [t for p in plans for t in (p[2], p[3])]
            edit_vecs = ar.reconstruct(edit_inputs) if edit_inputs else torch.zeros(0, d_model)
        # AR(original explanation) of each prompt: the round trip's reconstruction
        recon_orig = {p[0]: edit_vecs[2 * j].float() for j, p in enumerate(plans) if p[1] == "edited"}
        by_prompt: dict[int, dict[str, Any]] = {}
        for j, (ci, fam, orig, edited, mode, count) in enumerate(plans):
            delta = (edit_vecs[2 * j + 1] - edit_vecs[2 * j]).float().contiguous()
            by_prompt.setdefault(ci, {})[fam] = (orig, edited, mode, count, delta)
        proposals: list[Proposal] = []
        sel_rows: list[dict[str, Any]] = []
        for ci, ctx in enumerate(contexts):
            sel, idx = chosen[ci]
            if idx is None:
                proposals.extend(self._dropped(ctx.prompt.id, sel))
                sel_rows.append({"prompt_id": ctx.prompt.id, "selection": sel, **dict.fromkeys(SELECTION_EMPTY)})
                continue
            made, row = self._prompt_proposals(ctx, fid[(ci, idx)], texts[(ci, idx)][0], (sel, idx), by_prompt[ci],
                                               (acts[ci], recon_orig[ci]), baseline)
            proposals.extend(made)
            sel_rows.append(row)
        runtime.write_table("explanations", expl_rows)
        runtime.write_table("selections", sel_rows)
        return proposals

    def _explain(self, contexts: Sequence[PromptContext], acts: torch.Tensor, jobs: Sequence[tuple[int, int]],
                 runtime: MethodRuntime, av_res: Resource, d_model: int, layer: int
                 ) -> dict[tuple[int, int], tuple[str, str]]:
        """``(explanation, raw text)`` of every (prompt, sample) job, from the AV in batches.

        Every configured variant of this method draws the same explanations of the same
        activations (the sampling stream is keyed by the plugin's name, not its label, so the
        variant labelled ``nla_text_edit`` draws what it always drew), and the run computes them
        once (a shared cache): an oracle-assisted variant differs from the plain one in its edit
        alone, a paired comparison, and costs no second AV pass."""
        o = self.opts

        def sample() -> list[list[Any]]:
            rows: list[list[Any]] = []
            with runtime.load(av_res) as av:
                av.meta.check_compatible(d_model=d_model, layer=layer)
                batches = [jobs[i:i + o.batch_size] for i in range(0, len(jobs), o.batch_size)]
                for batch in runtime.progress(batches, desc="nla: explain", total=len(batches)):
                    vecs = acts[[ci for ci, _ in batch]]
                    gens = [runtime.generator(self.name, "nla_text_edit", contexts[ci].prompt.id, s, shared=True)
                            for ci, s in batch]
                    outs = av.explain(vecs, generators=None if o.greedy else gens, temperature=o.temperature,
                                      greedy=o.greedy, max_new_tokens=o.new_tokens)
                    rows += [[ci, s, expl, raw] for (ci, s), (expl, raw, _complete) in zip(batch, outs, strict=True)]
            return rows

        def key() -> dict[str, Any] | None:
            stamp = self._av_stamp()
            return None if stamp is None else {
                "av": stamp, "layer": layer, "position": self._position(), "dtype": str(self._dtype()),
                "activations": hashlib.sha256(acts.contiguous().numpy().tobytes()).hexdigest(),
                "prompts": [c.prompt.id for c in contexts], "jobs": [list(j) for j in jobs],
                "greedy": o.greedy, "temperature": o.temperature, "max_new_tokens": o.new_tokens,
                "batch_size": o.batch_size, "seed": runtime.seed}

        known = key()
        if known is not None:
            rows = runtime.cached("nla_explanations", known, sample, shared=True)
        else:  # the mini pair is not built yet: loading the AV builds it, then the key exists
            rows = sample()
            if (built := key()) is not None:
                runtime.cached("nla_explanations", built, lambda: rows, shared=True)
        return {(int(ci), int(s)): (expl, raw) for ci, s, expl, raw in rows}

    def _av_stamp(self) -> list[Any] | None:
        """What identifies the AV's weights without loading them: its source and, for a local
        directory (the mini pair's included), each file's name, size and modification time;
        ``None`` for a mini pair not built yet."""
        source = self.opts.av
        if source == MINI_ALIAS:
            from .mini import is_built, mini_dir

            root = mini_dir(self._position())
            if not is_built(root, self._position()):
                return None
            path = root / "av"
        else:
            path = Path(source).expanduser()
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
        return [source, *([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files)]

    def _plan_edits(self, contexts: Sequence[PromptContext], texts: Mapping[tuple[int, int], tuple[str, str]],
                    fid: Mapping[tuple[int, int], Any]) -> tuple[list[dict[str, Any]], dict[int, tuple[str, int | None]],
                                                             list[tuple[int, str, str, str, str, int]]]:
        """``(explanation rows, chosen sample per prompt, edit plans)``: each prompt's explanation
        is chosen by the selection rule, then edited for every family and reworded (paraphrase)."""
        o = self.opts
        expl_rows: list[dict[str, Any]] = []
        chosen: dict[int, tuple[str, int | None]] = {}
        plans: list[tuple[int, str, str, str, str, int]] = []
        for ci, ctx in enumerate(contexts):
            maps = {fam: edit_map_for(ctx.prompt, fam, cue=o.cue_edit) for fam in PROPOSAL_FAMILIES}
            terms = sorted({k for m in maps.values() for k in m})
            samples = [texts[(ci, s)][0] for s in range(o.n_explanations)]
            for s, e in enumerate(samples):
                f = fid[(ci, s)]
                expl_rows.append({
                    "prompt_id": ctx.prompt.id, "sample": s, "explanation": e,
                    "raw": texts[(ci, s)][1], "fve_nrm": f.fve_nrm, "mse_nrm": f.mse_nrm,
                    "cosine": f.cosine, "mentions_editable": bool(mentions(e, terms))})
            scores = [-fid[(ci, s)].mse_nrm for s in range(o.n_explanations)]
            chosen[ci] = select_explanation(samples, scores, terms, o.selection)
            _sel, idx = chosen[ci]
            if idx is None:
                continue
            for fam in PROPOSAL_FAMILIES:
                orig, edited, mode, count = edit_texts(samples[idx], maps[fam])
                plans.append((ci, fam, orig, edited, mode, count))
            reworded, applied = paraphrase(samples[idx], o.paraphrase_rules, terms)
            if applied:
                plans.append((ci, "paraphrase", samples[idx], reworded, "reworded", len(applied)))
        return expl_rows, chosen, plans

    def _dropped(self, pid: str, sel: str) -> list[Proposal]:
        """A prompt none of whose explanations names an editable term: every family dropped."""
        meta = {"selection": sel, "reason": "no explanation names an editable term",
                "n_explanations": self.opts.n_explanations}
        return [Proposal(prompt_id=pid, family=fam, status="dropped", meta=meta)
                for fam in (*PROPOSAL_FAMILIES, *COMPANION_FAMILIES)]

    def _prompt_proposals(self, ctx: PromptContext, f: Any, explanation: str, choice: tuple[str, int],
                          edits: Mapping[str, Any], round_trip_pair: tuple[torch.Tensor, torch.Tensor],
                          baseline: float) -> tuple[list[Proposal], dict[str, Any]]:
        """One prompt's proposals (each family, the paraphrase, the round trip) and its selection row."""
        o = self.opts
        sel, idx = choice
        pid = ctx.prompt.id
        status = sel
        if o.fidelity_gate is not None and sel == "editable" and not f.fve_nrm >= o.fidelity_gate:
            status = "below_fidelity"  # reported apart, like fallback prompts
        common = {"selection": sel, "sample": idx, "explanation": explanation, "fve_nrm": f.fve_nrm,
                  "mse_nrm": f.mse_nrm, "cosine": f.cosine, "fve_baseline": baseline,
                  "fidelity_gate": o.fidelity_gate, "av": o.av, "ar": o.ar,
                  **({"oracle_assisted": True} if o.cue_edit else {})}
        proposals = []
        for fam in PROPOSAL_FAMILIES:
            orig, edited, mode, count, delta = edits[fam]
            meta = {**common, "original_text": orig, "edited_text": edited, "edit_mode": mode,
                    "replacements": count, "delta_norm": float(delta.norm())}
            proposals.append(Proposal(prompt_id=pid, family=fam, delta=delta, status=status, meta=meta))
        target_norm = float(edits["edited"][4].norm())
        if "paraphrase" in edits:
            orig, reworded, _mode, count, delta = edits["paraphrase"]
            proposals.append(Proposal(prompt_id=pid, family="paraphrase", delta=delta, status=status, meta={
                **common, "original_text": orig, "paraphrase_text": reworded, "rules_applied": count,
                "delta_norm": float(delta.norm()), "target_delta_norm": target_norm}))
        else:
            proposals.append(Proposal(prompt_id=pid, family="paraphrase", status="dropped", meta={
                **common, "reason": "no paraphrase rule applies to the selected explanation"}))
        proposals.append(round_trip(pid, round_trip_pair[0], round_trip_pair[1], status, common))
        row = {"prompt_id": pid, "selection": sel, "sample": idx, "explanation": explanation,
               "edited_text": edits["edited"][1], "unrelated_text": edits["unrelated"][1],
               "fve_nrm": f.fve_nrm, "mse_nrm": f.mse_nrm, "cosine": f.cosine,
               "delta_norm": target_norm, "unrelated_delta_norm": float(edits["unrelated"][4].norm())}
        return proposals, row


#: the selection-table columns a dropped prompt leaves empty
SELECTION_EMPTY = ("sample", "explanation", "edited_text", "unrelated_text", "fve_nrm", "mse_nrm", "cosine",
                   "delta_norm", "unrelated_delta_norm")


def round_trip(prompt_id: str, activation: torch.Tensor, reconstruction: torch.Tensor, status: str,
               meta: Mapping[str, Any]) -> Proposal:
    """The round trip: replace the activation by the reconstruction of its own explanation,
    rescaled to the activation's norm (delta = rescaled AR(original) - h, applied once at alpha 1).
    A faithful pair moves the score and the next-token distribution little."""
    h = activation.float()
    r = reconstruction.float()
    scaled = r * (h.norm() / r.norm().clamp_min(1e-12))
    delta = (scaled - h).contiguous()
    cos = float(torch.nn.functional.cosine_similarity(r, h, dim=0))
    return Proposal(prompt_id=prompt_id, family="round_trip", delta=delta, status=status, fixed_alpha=1.0,
                    meta={**meta, "round_trip_cosine": cos, "delta_norm": float(delta.norm()),
                          "activation_norm": float(h.norm())})
