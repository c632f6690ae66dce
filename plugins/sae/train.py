"""steercmp's own SAE for the embedded Gemma 3 270M, trained with sae-lens on first use.

No SAE hub can be reached, so the ``sae_features`` method's default SAE (``path: embedded``) is
trained here: a sae-lens TopK SAE on the residual stream at the OUTPUT of block 12 (the layer
convention's "layer 12" = ``model.layers.12`` = ``hidden_states[13]``), on the generated corpus of
:mod:`steercmp_plugins.sae.corpus`.

How: activations are streamed from the HF model with a forward hook on ``model.layers.12`` that
stops the forward pass right after that block (the remaining blocks and the 262k-vocabulary output
layer are never run), BOS positions are dropped (their norm is orders of magnitude larger), and the
resulting tensor feeds sae-lens' :class:`~sae_lens.training.sae_trainer.SAETrainer` through its
``DataProvider`` seam (an iterator of activation batches). The SAE object, its training step, the
activation-norm scaling it folds into the weights, and the disk format (``cfg.json`` +
``sae_weights.safetensors``, loadable with ``SAE.load_from_disk``) are all sae-lens'. We use the
trainer rather than ``LanguageModelSAETrainingRunner`` because the runner wraps the model to run
every block and the output layer on each batch and runs CE-loss evals, which does not fit the
5-minute CPU budget.

Quality is measured on held-out text (a different corpus seed) and written to ``quality.json``
beside the weights: explained variance, L0 and the dead-feature fraction.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from steercmp.api import EMBEDDED_ID, cache_root, capture_tokens, progress_bar, resolve_dtype_name
from steercmp_plugins.sae.corpus import corpus_documents, corpus_fingerprint, pack_tokens

__all__ = [
    "EMBEDDED_SAE_NAME",
    "TrainSettings",
    "collect_activations",
    "embedded_sae_dir",
    "ensure_embedded_sae",
    "measure_quality",
    "train_topk_sae",
]

EMBEDDED_SAE_NAME = "gemma-3-270m-L12-v1"
MARKER = "steercmp_sae.json"
QUALITY = "quality.json"
#: measured build times (docs/scaling.md): 57-115 s on 2-core Xeon / EPYC CPUs with native bf16,
#: 478 s on a 2-core AVX2-only EPYC (Zen 1), where the probe picks float32
BUILD_ESTIMATE = "1 to 2 minutes on 2 CPU cores with native bf16, about 8 without"
#: quality targets from the issue: held-out explained variance and mean active features per token
TARGET_EV = 0.7
TARGET_L0 = 64


@attrs.frozen
class TrainSettings:
    """Everything that determines the embedded SAE (all of it goes into the cache marker)."""

    layer: int = 12
    d_sae: int = 2560
    k: int = 32
    context: int = 128
    n_couplets: int = 2400
    n_sentences: int = 3800
    heldout_couplets: int = 240
    heldout_sentences: int = 380
    seed: int = 0
    heldout_seed: int = 1
    epochs: int = 2
    batch_size: int = 512
    lr: float = 3e-3  # with b_dec at the mean; 4e-4 reached EV 0.48, 3e-3 0.76 on a 2.6k-token probe
    forward_batch_rows: int = 16
    #: dtype of the forward passes that produce TRAINING activations: ``auto`` is what a measured
    #: probe says this machine runs fastest (bfloat16 with native bf16, float32 on AVX2-only CPUs,
    #: where bf16 is ~7x slower; see steercmp.lm.device); held-out quality is always measured on
    #: float32 activations.
    train_forward_dtype: str = "auto"
    #: rows (of ``context`` tokens) of held-out text also measured on float32 activations
    heldout_fp32_rows: int = 8
    dead_feature_window: int = 1_000_000  # AuxK off: at 200 steps it dominated the loss (EV 0.54, 87% dead)


def embedded_sae_dir() -> Path:
    """Where the embedded SAE lives: ``<steercmp cache>/sae/gemma-3-270m-L12-v1``."""
    return cache_root() / "sae" / EMBEDDED_SAE_NAME


@torch.no_grad()
def collect_activations(
    lm: Any, tokens: torch.Tensor, layer: int, *, batch_rows: int = 8, progress: bool = True,
    desc: str = "SAE activations",
) -> torch.Tensor:
    """Residual stream at the output of block ``layer`` for ``tokens`` ``[rows, ctx]``, BOS
    position dropped: float32 ``[rows * (ctx - 1), d_model]`` (the forward stops after block
    ``layer``; see :func:`steercmp.lm.capture.capture_tokens`)."""
    captured: list[torch.Tensor] = []
    for start in progress_bar(range(0, tokens.shape[0], batch_rows), enabled=progress, desc=desc, unit="batch"):
        hidden = capture_tokens(lm, layer, tokens[start: start + batch_rows])
        captured.append(hidden[:, 1:, :].detach().float().cpu())
    return torch.cat(captured).reshape(-1, captured[0].shape[-1])


def _batches(acts: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """An endless stream of shuffled activation batches (a sae-lens ``DataProvider``)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(acts.shape[0], generator=gen)
        for start in range(0, acts.shape[0] - batch_size + 1, batch_size):
            yield acts[order[start : start + batch_size]]


def train_topk_sae(acts: torch.Tensor, settings: TrainSettings, *, hook_name: str,
                   model_name: str, progress: bool = True) -> Any:
    """Train a sae-lens TopK SAE on ``acts`` ``[n, d_in]`` with sae-lens' ``SAETrainer``.

    Activations are normalised by sae-lens (``expected_average_only_in``) and the scale is folded
    back into the weights at the end, so the returned SAE takes raw residual vectors.
    """
    os.environ["WANDB_MODE"] = "disabled"
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(settings.seed)
    cfg = TopKTrainingSAEConfig(
        d_in=int(acts.shape[1]), d_sae=settings.d_sae, k=settings.k,
        normalize_activations="expected_average_only_in",
    )
    cfg.metadata.hook_name = hook_name
    cfg.metadata.model_name = model_name
    cfg.metadata.model_class_name = "AutoModelForCausalLM"
    cfg.metadata.prepend_bos = True
    cfg.metadata.context_size = settings.context
    sae = TopKTrainingSAE(cfg)
    init_decoder_bias(sae, acts)
    n_samples = settings.epochs * (acts.shape[0] // settings.batch_size) * settings.batch_size
    trainer_cfg = SAETrainerConfig(
        total_training_samples=n_samples, train_batch_size_samples=settings.batch_size,
        lr=settings.lr, lr_end=settings.lr / 10, lr_scheduler_name="cosineannealing",
        lr_decay_steps=n_samples // settings.batch_size // 2,
        dead_feature_window=settings.dead_feature_window,
        feature_sampling_window=10**9, n_batches_for_norm_estimate=20,
        logger=LoggingConfig(log_to_wandb=False),
    )
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(
        acts, settings.batch_size, settings.seed))
    return trainer.fit()


@torch.no_grad()
def init_decoder_bias(sae: Any, acts: torch.Tensor) -> None:
    """Start ``b_dec`` at the (normalised) activation mean.

    Gemma's residual stream carries a huge constant component (one dimension of the layer-12
    residual sits near 13k while the spread around the mean is a small fraction of the norm).
    From a zero init, Adam moves ``b_dec`` by about ``lr`` per step and never reaches it, so the
    features spend themselves encoding the mean: negative explained variance, mostly dead
    features. The trainer normalises inputs by ``sqrt(d_in) / E||x||``, so the mean is scaled
    the same way.
    """
    scale = math.sqrt(acts.shape[1]) / float(acts.norm(dim=-1).mean())
    sae.b_dec.data.copy_((acts.mean(0) * scale).to(sae.b_dec.dtype))


@torch.no_grad()
def measure_quality(sae: Any, acts: torch.Tensor, *, chunk: int = 4096) -> dict[str, float]:
    """Held-out quality of an SAE on raw activations ``[n, d_in]``.

    ``explained_variance`` = 1 - SSE / SST with SST around the held-out mean; ``l0`` = mean number
    of active features per token; ``dead_fraction`` = share of features that never fire on the
    held-out tokens.
    """
    sse = 0.0
    l0_sum = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = acts.mean(0)
    sst = float(((acts - mean) ** 2).sum())
    for start in range(0, acts.shape[0], chunk):
        x = acts[start : start + chunk]
        codes = sae.encode(x)
        recon = sae.decode(codes)
        sse += float(((x - recon) ** 2).sum())
        active = codes != 0
        l0_sum += float(active.sum())
        fired |= active.any(0).cpu()
    n = acts.shape[0]
    return {
        "explained_variance": 1.0 - sse / sst,
        "l0": l0_sum / n,
        "dead_fraction": float((~fired).float().mean()),
        "heldout_tokens": int(n),
    }


def _settings_key(settings: TrainSettings, fingerprint: str) -> dict[str, Any]:
    return {"settings": attrs.asdict(settings), "corpus": fingerprint, "name": EMBEDDED_SAE_NAME,
            "forward_dtype": resolve_dtype_name(settings.train_forward_dtype)}


def _corpus_and_key(settings: TrainSettings) -> tuple[list[str], list[str], dict[str, Any]]:
    train_docs = corpus_documents(settings.n_couplets, settings.n_sentences, settings.seed)
    held_docs = corpus_documents(settings.heldout_couplets, settings.heldout_sentences,
                                 settings.heldout_seed)
    return train_docs, held_docs, _settings_key(settings, corpus_fingerprint(train_docs + held_docs))


def _cached(target: Path, key: dict[str, Any]) -> bool:
    """Whether ``target`` holds a finished SAE trained with ``key`` (the marker is written last)."""
    try:
        return bool(json.loads((target / MARKER).read_text()).get("key") == key)
    except (OSError, ValueError):
        return False


def embedded_sae_ready(settings: TrainSettings | None = None) -> bool:
    """Whether the embedded SAE is cached for these settings (no training on first use)."""
    return _cached(embedded_sae_dir(), _corpus_and_key(settings or TrainSettings())[2])


def ensure_embedded_sae(progress: bool = True, *, settings: TrainSettings | None = None,
                        lm: Any = None) -> Path:
    """Return the directory of the embedded SAE (sae-lens disk format), training it on first use.

    The cache is reused when its marker matches the settings and the corpus fingerprint; training
    writes to a temporary directory and renames it into place. ``lm`` may pass an already loaded
    :class:`steercmp.lm.load.LoadedModel` of the embedded model (else it is loaded and released).
    """
    settings = settings or TrainSettings()
    target = embedded_sae_dir()
    train_docs, held_docs, key = _corpus_and_key(settings)
    if _cached(target, key):
        q = read_quality(target)
        if q is not None and not q.get("meets_targets", False):
            import warnings

            warnings.warn(f"cached {format_quality(q)}", stacklevel=2)
        return target
    from steercmp.api import build_lock, in_fresh_process

    with build_lock(target, "the embedded SAE"):
        if _cached(target, key):  # another process built it while this one waited
            return target
        if lm is not None:  # a caller's loaded model cannot cross to another process
            return _train_embedded_sae(settings, target, key, train_docs, held_docs, lm, progress)
        # in a fresh process: its training heap is returned to the OS when it ends
        return in_fresh_process("the embedded SAE", _train_embedded_sae, settings, target, key, train_docs,
                                held_docs, None, progress)


def _train_embedded_sae(settings: TrainSettings, target: Path, key: dict[str, Any], train_docs: list[str],
                        held_docs: list[str], lm: Any, progress: bool) -> Path:
    from steercmp.api import load_base_model, parse_dtype, release

    own_model = lm is None
    if own_model:
        lm = load_base_model(EMBEDDED_ID, dtype="float32", progress=progress)
    lm_dtype = lm.dtype
    t0 = time.perf_counter()
    try:
        bos = lm.tokenizer.bos_token_id
        train_tokens = pack_tokens(train_docs, lm.tokenizer, settings.context, bos)
        held_tokens = pack_tokens(held_docs, lm.tokenizer, settings.context, bos)
        # float32 held-out sample first (the dtype the method sees by default), then everything
        # else in the fast training dtype on our private copy of the model
        held_fp32 = collect_activations(lm, held_tokens[: settings.heldout_fp32_rows], settings.layer,
                                        batch_rows=settings.forward_batch_rows, progress=progress,
                                        desc="embedded SAE: held-out activations, float32")
        if own_model:
            lm.model.to(parse_dtype(settings.train_forward_dtype, "cpu"))
        held = collect_activations(lm, held_tokens, settings.layer,
                                   batch_rows=settings.forward_batch_rows, progress=progress,
                                   desc="embedded SAE: held-out activations")
        acts = collect_activations(lm, train_tokens, settings.layer,
                                   batch_rows=settings.forward_batch_rows, progress=progress,
                                   desc="embedded SAE: training activations (once)")
    finally:
        if own_model:
            release(lm)
    t_acts = time.perf_counter() - t0
    hook_name = f"model.layers.{settings.layer}"
    sae = train_topk_sae(acts, settings, hook_name=hook_name, model_name=EMBEDDED_ID,
                         progress=progress)
    t_train = time.perf_counter() - t0 - t_acts
    sae.eval()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save_inference_model(tmp)
    from sae_lens import SAE

    inference = SAE.load_from_disk(tmp)  # measure what was saved, in the inference class
    quality = measure_quality(inference, held)
    q32 = measure_quality(inference, held_fp32)
    quality["float32_heldout"] = {k: q32[k] for k in ("explained_variance", "l0", "heldout_tokens")}
    quality.update({
        "train_tokens": int(acts.shape[0]),
        "seconds_activations": round(t_acts, 1),
        "seconds_training": round(t_train, 1),
        "seconds_total": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "forward_dtype": (resolve_dtype_name(settings.train_forward_dtype) if own_model else str(lm_dtype)),
        "d_in": int(acts.shape[1]), "d_sae": settings.d_sae, "k": settings.k,
        "layer": settings.layer, "hook_name": hook_name,
        "targets": {"explained_variance_min": TARGET_EV, "l0_max": TARGET_L0},
    })
    quality["meets_targets"] = bool(quality["explained_variance"] >= TARGET_EV
                                    and quality["l0"] <= TARGET_L0)
    (tmp / QUALITY).write_text(json.dumps(quality, indent=2))
    (tmp / MARKER).write_text(json.dumps({"key": key}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    if progress:
        print(format_quality(quality))
    return target


def format_quality(q: dict[str, Any]) -> str:
    """One line for logs and notes."""
    ok = "meets targets" if q.get("meets_targets") else "BELOW TARGETS"
    return (f"embedded SAE (layer {q['layer']}, TopK k={q['k']}, d_sae {q['d_sae']}, "
            f"{q['train_tokens']} train tokens): held-out EV {q['explained_variance']:.3f}, "
            f"L0 {q['l0']:.1f}, dead {q['dead_fraction']:.1%}; "
            f"{q['seconds_total']:.0f} s ({q['seconds_activations']:.0f} s activations, "
            f"{q['seconds_training']:.0f} s training); {ok}")


def read_quality(path: Path | None = None) -> dict[str, Any] | None:
    """The stored ``quality.json`` of the embedded SAE, or ``None`` if it is not built."""
    f = (path or embedded_sae_dir()) / QUALITY
    return json.loads(f.read_text()) if f.exists() else None
