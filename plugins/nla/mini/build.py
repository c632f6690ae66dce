"""Building the mini pair: grounded explanations from the base model's own behaviour; the AV's
top blocks fine-tuned on cached block-12 outputs (the gold vector injected as in the release) with
a restricted output vocabulary; the AR's top blocks and value head trained by gradient on the
normalised MSE (the head starting from its closed-form ridge fit); both written in the released
layout, with the three quality targets measured on held-out battery prompts."""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import shutil
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from safetensors.torch import save_file

from steercmp.api import (
    EMBEDDED_ID,
    capture_embeds,
    last_block_at,
    load_base_model,
    pad_batch,
    progress_bar,
    resolve_dtype_name,
    top_blocks_only,
    truncate_blocks,
)

from ..ar import ar_prompt_ids, check_suffix
from ..checkpoint import as_id_list
from ..fidelity import normalise
from ..meta import SIDECAR_NAME, VALUE_HEAD_NAME, NlaMeta
from .data import (
    AR_BATCH,
    AR_EPOCHS,
    AR_LR,
    AR_TEMPLATE,
    AR_TRAIN_BLOCKS,
    AV_BATCH,
    AV_EPOCHS,
    AV_LR,
    AV_TEMPLATE,
    CHAT_TEMPLATE,
    INJECTION_CANDIDATES,
    LAYER,
    N_NEGATIVES,
    POSITIONS,
    SEED,
    TRAIN_FROM_BLOCK,
    battery_words,
    make_eval_items,
    make_training_couplets,
    mini_name,
    read_items,
)
from .evaluate import evaluate
from .train_ar import ArSchedule, length_batches, train_ar

#: the issue's quality targets, checked and saved with every build
TARGETS = {"fve_nrm_av": 0.7, "name_rate": 0.8, "build_seconds": 5 * 60}  # issue 20's targets


def train_autocast() -> tuple[str, Any]:
    """``(dtype name, context factory)`` for the builders' training passes: bf16 autocast (fp32
    master weights, fp32 losses) where the machine's measured probe picks bf16, fp32 elsewhere
    (``STEERCMP_DTYPE=float32`` forces it). The gold activations and grounded explanations are
    read by the base model loaded in that dtype: as the run will read its activations."""
    name = resolve_dtype_name("auto", "cpu")
    if name == "bfloat16":
        return name, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return "float32", contextlib.nullcontext


def machine_record() -> dict[str, Any]:
    """What a slow build is explained by: the CPU, its vector capability and torch's threads."""
    return {"processor": platform.processor() or platform.machine(), "platform": platform.platform(),
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


@attrs.define
class _Build:
    """One build's settings, its record (``quality.json``) and the clock of its stages."""

    tmp: Path
    seed: int
    position: str
    progress: bool
    autocast: Any
    log: dict[str, Any]
    stage_seconds: dict[str, float] = attrs.field(factory=dict)
    t_last: float = attrs.field(factory=time.time)

    def lap(self, stage: str) -> None:
        """Record the seconds since the previous lap under ``stage``."""
        now = time.time()
        self.stage_seconds[stage], self.t_last = round(now - self.t_last, 1), now

    def bar(self, total: int, desc: str) -> Any:
        return progress_bar(enabled=self.progress, total=total, desc=f"nla mini: {desc}")

    def frozen(self) -> Any:
        """The base model for the passes that train nothing (the read, the AV's inputs, the AR's
        frozen blocks), loaded in the training dtype: as the run reads its activations, and in
        bf16 2.5-3x faster than the float32 master weights under autocast, which casts every
        weight at every call. A bf16 load maps the cached copy: loading it again is cheap."""
        dtype = "float32" if self.autocast is contextlib.nullcontext else "bfloat16"
        return load_base_model(EMBEDDED_ID, dtype=dtype, device="cpu", progress=False)


def build_mini_pair(root: Path, *, progress: bool = True, seed: int = SEED,
                    position: str = POSITIONS[0]) -> dict[str, Any]:
    """Build the miniature pair read at ``position`` into ``root/{av,ar}`` and write
    ``root/quality.json`` (built in ``root.tmp`` and renamed into place only when complete)."""
    t0 = time.time()
    train_dtype, autocast = train_autocast()
    torch.manual_seed(seed)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "av").mkdir(parents=True)
    (tmp / "ar").mkdir(parents=True)
    b = _Build(tmp, seed, position, progress, autocast, {
        "seed": seed, "layer": LAYER, "position": position, "base": EMBEDDED_ID,
        "mini_version": mini_name(position), "train_dtype": train_dtype, "machine": machine_record()})
    train, evals, gold_train, gold_eval = _read_data(b, b.frozen())
    _build_av(b, train, gold_train)
    _build_ar(b, train, evals, gold_train, gold_eval)
    quality = evaluate(tmp / "av", tmp / "ar", evals, gold_eval, progress=progress, seed=seed)
    log = b.log
    log.update(quality)
    b.lap("evaluate")
    log["stage_seconds"] = b.stage_seconds
    log["build_seconds"] = round(time.time() - t0, 1)
    log["targets"] = {k: {"target": v, "measured": log[k],
                          "met": bool(log[k] <= v if k == "build_seconds" else log[k] >= v)}
                      for k, v in TARGETS.items()}
    (tmp / "quality.json").write_text(json.dumps(log, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    if progress:
        print(quality_lines(log, root))
    return log


def _read_data(b: _Build, lm: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], torch.Tensor, torch.Tensor]:
    """``(training couplets, held-out items, their gold vectors)``; every item gets its grounded
    explanation from the same read pass."""
    battery_vocab, _ = battery_words()
    banned: set[str] = set()  # words are not held out; battery prompt texts are (see make_eval_items)
    train = make_training_couplets(lm.tokenizer, banned, b.seed)
    evals = make_eval_items(lm.tokenizer, b.seed)
    b.log.update(battery_words_in_training=len(battery_vocab), n_train=len(train), n_eval=len(evals),
                 held_out_words=sorted(banned))
    bar = b.bar(len(train) + len(evals), "layer-12 activations and predictions")
    gold_train = read_items(lm, train, b.position, bar)  # gold vectors; grounded explanations in place
    gold_eval = read_items(lm, evals, b.position, bar)
    bar.close()
    b.lap("read")
    return train, evals, gold_train, gold_eval


def _build_av(b: _Build, train: list[dict[str, Any]], gold_train: torch.Tensor) -> None:
    """The AV: the base with a chat template and an injection character; blocks 13..17 fine-tuned
    (float32 master weights) on cached block-12 outputs of the frozen model (the gold vector
    injected as in the release), restricted vocabulary."""
    lm = load_base_model(EMBEDDED_ID, dtype="float32", device="cpu", progress=False)
    tok, model, d = lm.tokenizer, lm.model, lm.d_model
    scale = float(gold_train.norm(dim=-1).mean())
    tok.chat_template = CHAT_TEMPLATE
    inj = next(c for c in INJECTION_CANDIDATES if len(tok.encode(c, add_special_tokens=False)) == 1)
    inj_id = tok.encode(inj, add_special_tokens=False)[0]
    content = AV_TEMPLATE.format(injection_char=inj)
    prompt = as_id_list(tok.apply_chat_template([{"role": "user", "content": content}],
                                                tokenize=True, add_generation_prompt=True))
    site = prompt.index(inj_id)
    av_meta = {
        "kind": "nla_model", "role": "av", "d_model": d, "base_model": EMBEDDED_ID,
        "extraction_layer_index": LAYER, "mini_version": b.log["mini_version"], "extraction_position": b.position,
        "extraction": {"injection_scale": round(scale, 3), "mse_scale": "sqrt_d_model"},
        "tokens": {"injection_char": inj, "injection_token_id": inj_id,
                   "injection_left_neighbor_id": prompt[site - 1],
                   "injection_right_neighbor_id": prompt[site + 1]},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
    }
    end_id = tok.convert_tokens_to_ids("<end_of_turn>")
    targets = [tok.encode(f"<explanation>{it['explanation']}</explanation>",
                          add_special_tokens=False) + [end_id] for it in train]
    sub_ids = sorted({t for tt in targets for t in tt})
    rng = random.Random(f"nla-mini-neg:{b.seed}")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    sub_ids = sorted(set(sub_ids) | set(rng.sample(range(vocab_size), N_NEGATIVES)))
    remap = torch.full((vocab_size,), -100, dtype=torch.long)
    remap[torch.tensor(sub_ids)] = torch.arange(len(sub_ids))
    w_sub = model.get_input_embeddings().weight.detach()[torch.tensor(sub_ids)].clone()
    frozen = b.frozen()
    cached = _av_inputs(b, frozen, (prompt, site), targets, gold_train, scale)
    frozen.unload()
    b.lap("av_inputs")
    _train_av(b, model, cached, [remap[torch.tensor(t)] for t in targets], w_sub, len(prompt))
    b.lap("av_train")
    del cached
    model.save_pretrained(b.tmp / "av", safe_serialization=True)
    tok.save_pretrained(b.tmp / "av")
    (b.tmp / "av" / SIDECAR_NAME).write_text(yaml.safe_dump(av_meta, allow_unicode=True, sort_keys=False))
    lm.unload()


def _av_inputs(b: _Build, lm: Any, prompt_site: tuple[list[int], int], targets: list[list[int]],
               gold: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """Block-12 outputs of every training sequence (the AV prompt with ``gold[i]`` at the site,
    scaled to ``scale``, then the target explanation): the frozen blocks run once, not every epoch."""
    prompt, site = prompt_site
    model = lm.model
    embed = model.get_input_embeddings()
    base_prompt = embed(torch.tensor([prompt])).detach()[0]
    n_prompt = len(prompt)
    cached: list[torch.Tensor] = [torch.empty(0)] * len(targets)
    by_length = sorted(range(len(targets)), key=lambda i: len(targets[i]))  # little padding
    bar = b.bar(len(targets), "AV inputs")
    for s in range(0, len(targets), AV_BATCH):
        idx = by_length[s:s + AV_BATCH]
        seqs = [targets[i] for i in idx]
        ids, _, _ = pad_batch(seqs, lm.tokenizer.pad_token_id or 0)
        with torch.no_grad():  # the frozen model in its own dtype, as the run's AV reads it
            emb = torch.cat([base_prompt.expand(len(idx), -1, -1), embed(ids)], dim=1)
            v = gold[idx]
            emb[:, site] = v / v.norm(dim=-1, keepdim=True) * scale
            h = capture_embeds(model, TRAIN_FROM_BLOCK - 1, emb)
        for row, i in enumerate(idx):
            cached[i] = h[row, : n_prompt + len(seqs[row])].float().clone()
        bar.update(len(idx))
    bar.close()
    return cached


def _train_av(b: _Build, model: torch.nn.Module, cached: list[torch.Tensor], labels_of: list[torch.Tensor],
              w_sub: torch.Tensor, n_prompt: int) -> None:
    """Fine-tune blocks 13..17 in place: next-token cross-entropy over the restricted vocabulary
    (``labels_of[i]``: sequence i's target ids in it) on the explanation tokens only."""
    decoder, d = model.get_decoder(), w_sub.shape[-1]
    trainable = [p for blk in list(decoder.layers)[TRAIN_FROM_BLOCK:] for p in blk.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=AV_LR, weight_decay=0.0, fused=True)
    steps_total = AV_EPOCHS * math.ceil(len(cached) / AV_BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps_total))
    g = torch.Generator().manual_seed(b.seed)
    bar = b.bar(steps_total, "train AV")
    losses = []
    model.train()
    for _ in range(AV_EPOCHS):
        for idx in length_batches([c.shape[0] for c in cached], AV_BATCH, g):
            width = max(cached[i].shape[0] for i in idx)
            x = torch.zeros(len(idx), width, d)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            for j, i in enumerate(idx):
                n = cached[i].shape[0]
                x[j, :n] = cached[i]
                labels[j, n_prompt - 1: n - 1] = labels_of[i]
            rows, cols = (labels != -100).nonzero(as_tuple=True)  # the explanation's tokens
            with top_blocks_only(model, TRAIN_FROM_BLOCK) as top, last_block_at(model, rows, cols), b.autocast():
                logits = top(inputs_embeds=x, use_cache=False).last_hidden_state[0] @ w_sub.T
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[rows, cols])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    model.requires_grad_(False)
    b.log["av_loss_final"] = sum(losses[-10:]) / max(1, len(losses[-10:]))


def _build_ar(b: _Build, train: list[dict[str, Any]], evals: list[dict[str, Any]], gold_train: torch.Tensor,
              gold_eval: torch.Tensor) -> None:
    """The AR: the base truncated to blocks 0..12; the value head by ridge, then the top blocks
    and the head by gradient (:func:`.train_ar.train_ar`); written in the released layout."""
    lm = load_base_model(EMBEDDED_ID, dtype="float32", device="cpu", progress=False)
    tok = lm.tokenizer
    truncate_blocks(lm.model, LAYER + 1)  # its weights are saved once, after training
    tok.save_pretrained(b.tmp / "ar")
    suffix = common_suffix(tok(AR_TEMPLATE.format(explanation=e))["input_ids"]
                           for e in ("The line ends with x.", "planning dream or seem", "-eam"))
    ar_meta = {
        "kind": "nla_model", "role": "ar", "d_model": lm.d_model, "base_model": EMBEDDED_ID,
        "extraction_layer_index": LAYER, "mini_version": b.log["mini_version"], "extraction_position": b.position,
        "ar": {"num_hidden_layers": LAYER},
        "extraction": {"injection_scale": None, "mse_scale": "sqrt_d_model"},
        "tokens": {"critic_suffix_ids": suffix},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
    }
    (b.tmp / "ar" / SIDECAR_NAME).write_text(yaml.safe_dump(ar_meta, sort_keys=False))
    meta = NlaMeta.from_yaml(b.tmp / "ar" / SIDECAR_NAME)

    def prompt_ids(text: str) -> list[int]:
        """The released-layout AR prompt (the loader's own function), suffix checked."""
        ids = ar_prompt_ids(tok, meta, text)
        check_suffix(ids, meta)
        return ids

    target = normalise(gold_train)

    def fit_head(feats: torch.Tensor) -> torch.Tensor:
        """The ridge fit on the frozen backbone's features (the v1 AR), lambda chosen on a
        held-in split of the training couplets."""
        n_fit = int(len(train) * 0.85)
        best = None
        for lam in (1e-2, 1e-1, 1.0, 10.0, 100.0):
            w = _ridge(feats[:n_fit], target[:n_fit], lam)
            mse = float(((normalise(feats[n_fit:] @ w) - target[n_fit:]) ** 2).mean())
            if best is None or mse < best[0]:
                best = (mse, lam)
        b.log["ar_ridge_lambda"] = best[1]
        return _ridge(feats, target, best[1])

    b.lap("save_av_load_ar")
    w, curves = train_ar(lm, prompt_ids, ([it["explanation"] for it in train], gold_train),
                         ([it["explanation"] for it in evals], gold_eval), fit_head,
                         ArSchedule(blocks=AR_TRAIN_BLOCKS, epochs=AR_EPOCHS, batch=AR_BATCH, lr=AR_LR, seed=b.seed),
                         progress=b.progress, autocast=b.autocast, frozen_model=b.frozen())
    b.lap("ar")
    b.log["ar_training"] = curves
    # the loss is scale-free (sqrt(d)-normalised); a released AR outputs vectors in the activation's
    # own scale, and deltas AR(edited) - AR(original) are injected raw, so rescale the head to the
    # mean gold norm (fidelity is measured after normalising, so it is unchanged)
    factor = float(gold_train.norm(dim=-1).mean()) / max(curves["pred_norm_mean"], 1e-12)
    lm.model.save_pretrained(b.tmp / "ar", safe_serialization=True)  # the trained top blocks
    save_file({"weight": (w * factor).T.contiguous()}, str(b.tmp / "ar" / VALUE_HEAD_NAME))
    b.log["ar_output_scale"] = factor
    lm.unload()


def quality_lines(log: dict[str, Any], root: Path) -> str:
    """The three quality targets as printed after a build (and by ``nla build-mini``)."""
    t = log["targets"]

    def mark(k: str) -> str:
        return "met" if t[k]["met"] else "MISSED"

    curve = log.get("ar_training", {})
    held = curve.get("heldout_fve_nrm") or []
    return (f"nla mini pair {log.get('mini_version', '')} built in {log['build_seconds']:.0f} s -> {root}\n"
            f"  held-out AR fve_nrm from the AV's own explanations: {log['fve_nrm_av']:.3f} "
            f"(target >= {t['fve_nrm_av']['target']}: {mark('fve_nrm_av')}); from the grounded (oracle) "
            f"explanations: {log['fve_nrm_oracle']:.3f}\n"
            f"  AV names the line-end word or a plan word: {log['name_rate']:.1%} "
            f"(target >= {t['name_rate']['target']:.0%}: {mark('name_rate')})\n"
            f"  build: {log['build_seconds']:.0f} s (target <= {t['build_seconds']['target']} s: "
            f"{mark('build_seconds')})\n"
            f"  AR learning curve, held-out oracle fve_nrm by epoch: "
            f"{', '.join(f'{x:.3f}' for x in held)}")


def common_suffix(seqs) -> list[int]:  # noqa: ANN001
    """The longest common tail of token sequences (the stable end of the AR prompt)."""
    seqs = [list(s) for s in seqs]
    out: list[int] = []
    while all(len(s) > len(out) for s in seqs) and len({s[-1 - len(out)] for s in seqs}) == 1:
        out.insert(0, seqs[0][-1 - len(out)])
    return out


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """``W`` minimising ``||x W - y||^2 + lam * n * ||W||^2`` (no bias), fp64 solve."""
    x64, y64 = x.double(), y.double()
    gram = x64.T @ x64
    reg = lam * torch.trace(gram) / gram.shape[0]
    return torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=torch.float64),
                              x64.T @ y64).float()


