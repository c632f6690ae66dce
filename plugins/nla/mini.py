"""A miniature NLA pair for the embedded Gemma 3 270M (layer 12), built by steercmp on first use.

No NLA exists for the 270M model, so steercmp trains a small one on its own deterministic data and
writes it in EXACTLY the released layout (config.json, safetensors, tokenizer with a chat
template, ``nla_meta.yaml``; the AR adds ``value_head.safetensors`` and is truncated to blocks
0..12). It is then loaded by the same loader as the released checkpoints.

Data: couplets (:func:`steercmp.rhymes.make_couplets` plus the same first-line templates over a
wider CMU lexicon, so the AV learns to read words it has not seen), with every battery PROMPT held
out (battery words appear in other training couplets, so the AV can name them). Gold vectors
are the base model's layer-12 output at the first line break (the planning position). Explanations are templated: they name the line-end word, its spelled rhyme ending and
two plan words.

Training (CPU-sized): the AV is the base model with blocks 13..17 fine-tuned on cached block-12
outputs and a restricted output vocabulary (the 262k-vocab output layer dominates CPU cost); the
AR's value head is fit in closed form (ridge regression) on the frozen truncated backbone's
last-token features. Every random choice is seeded.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from steercmp.embedded import EMBEDDED_ID, cache_root
from steercmp.rhymes import FIRST_LINE_TEMPLATES

MINI_NAME = "gemma-3-270m-L12-mini-v1"
LAYER = 12
SEED = 1234
INJECTION_CANDIDATES = ("\u321c", "\u3231", "\u3239", "\u2603")
AV_TEMPLATE = ("Explain the activation <concept>{injection_char}</concept> as a rhyme plan. "
               "Answer inside <explanation></explanation> tags.")
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<start_of_turn>"
                 "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
                 "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
                 "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
FIRST_LINES = FIRST_LINE_TEMPLATES  # the battery generator's first lines (steercmp.rhymes)
SECOND_LINES = (
    "And then I turned and gazed upon the",
    "And all the while I thought about the",
    "And every night I dreamed about the",
    "But in the end we only found the",
    "So now I sit and think about the",
    "Until at last I reached the distant",
)
N_COUPLETS = 400       # from steercmp.rhymes.make_couplets
N_LEXICON = 700        # extra couplets over the wider lexicon
N_EVAL_EXTRA = 0       # extra template couplets in the evaluation (0: battery prompts only)
N_EVAL_MAX = 32        # held-out evaluation prompts: the shipped batteries' couplets
N_BATTERY_WORD_COUPLETS = 4  # training couplets per battery line-end word (other contexts)
TRAIN_FROM_BLOCK = 13  # AV blocks 13..17 are fine-tuned
AV_EPOCHS = 2
AV_BATCH = 16
AV_LR = 3e-4
N_NEGATIVES = 6000     # extra output-vocabulary tokens kept in the restricted softmax


def mini_dir() -> Path:
    return cache_root() / "nla" / MINI_NAME


def is_built(root: Path | None = None) -> bool:
    root = root or mini_dir()
    return all((root / p).exists() for p in ("av/nla_meta.yaml", "ar/nla_meta.yaml",
                                             "ar/value_head.safetensors", "quality.json"))


def ensure_mini_pair(progress: bool = True, *, force: bool = False) -> tuple[Path, Path]:
    """Return ``(av_dir, ar_dir)`` of the miniature pair, building it (once) if needed."""
    root = mini_dir()
    if force or not is_built(root):
        build_mini_pair(root, progress=progress)
    return root / "av", root / "ar"


# --------------------------------------------------------------------------- data


def rhyme_ending(word: str) -> str:
    """The spelled rhyme ending: last vowel group plus what follows (stream -> eam)."""
    m = re.search(r"[aeiouy]+[^aeiouy]*e?$", word.lower())
    return m.group(0) if m else word.lower()


def explanation_for(line_end: str, plans: Sequence[str]) -> str:
    plan_txt = " or ".join(plans[:2])
    return (f"The line ends with {line_end}, so the next line should rhyme with "
            f"-{rhyme_ending(line_end)}, planning {plan_txt}.")


def battery_words(root: Path | None = None) -> tuple[set[str], list[dict[str, Any]]]:
    """All words of the shipped batteries (held out of training) and their prompts."""
    root = root or Path(__file__).resolve().parents[2] / "experiments" / "batteries"
    words: set[str] = set()
    prompts: list[dict[str, Any]] = []
    for path in sorted(root.glob("*.yaml")) if root.is_dir() else []:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            continue
        for p in data.get("prompts") or []:
            fams = p.get("families") or {}
            for fam in fams.values():
                words.update(str(w).lower() for w in fam)
            first = str(p.get("text", "")).split("\n", 1)[0]
            toks = [w.strip(".,;:!?\"'()").lower() for w in first.split()]
            if toks:
                words.add(toks[-1])
            prompts.append(p)
    if not prompts:  # the note's prompt ids
        words |= {"bird", "word", "fire", "desire", "hill", "still", "night", "light", "rain",
                  "pane", "shore", "more", "snow", "glow", "stream", "dream"}
    return words, prompts


def _lexicon(tokenizer, banned: set[str]) -> list[tuple[str, list[str]]]:  # noqa: ANN001
    from steercmp import rhymes

    single = rhymes.single_token_filter(tokenizer)
    rhymes.rhyme_part("a")
    index = rhymes._index()[1]  # rhyme part -> words (sorted); read-only use
    out = []
    for part in sorted(index):
        words = [w for w in index[part] if w.isalpha() and w.isascii() and len(w) >= 3
                 and w not in banned and rhymes.is_common(w)]
        words = [w for w in words if single(w)]
        if len(words) >= 3:
            for w in words:
                out.append((w, [x for x in words if x != w]))
    return out


def battery_word_couplets(seed: int = SEED) -> list[dict[str, Any]]:
    """Template couplets over each battery prompt's line-end word, planning its original family.

    The battery PROMPTS stay held out (their texts never appear in training); their words do
    appear, in other contexts, so the AV can learn to name them and the text edit has terms to
    edit. Without this every battery prompt falls back (the AV cannot name a word it never saw).
    """
    _, prompts = battery_words()
    rng = random.Random(f"nla-mini-battery:{seed}")
    texts = {str(p.get("text")) for p in prompts}
    items = []
    for p in prompts:
        first = str(p["text"]).split("\n", 1)[0]
        end = first.split()[-1].strip(".,;:!?\"'()").lower()
        plans = [str(w).lower() for w in (p.get("families") or {}).get("original", [])][:2] or [end]
        for first_t in rng.sample(FIRST_LINES, N_BATTERY_WORD_COUPLETS):
            text = first_t.format(w=end) + "\n" + rng.choice(SECOND_LINES)
            if text not in texts:
                items.append({"text": text, "line_end": end, "plans": plans})
    return items


def make_training_couplets(tokenizer, banned: set[str], seed: int = SEED  # noqa: ANN001
                           ) -> list[dict[str, Any]]:
    from steercmp.rhymes import make_couplets, rhyme_group, single_token_filter

    rng = random.Random(f"nla-mini:{seed}")
    single = single_token_filter(tokenizer)
    items = []
    for c in make_couplets(N_COUPLETS, seed, exclude=sorted(banned)):
        group = [w for w in rhyme_group(c.line_end, vocab_filter=single) if w not in banned]
        others = [w for w in group if w != c.plan]
        plans = [c.plan] + ([rng.choice(others)] if others else [])
        items.append({"text": c.text, "line_end": c.line_end, "plans": plans})
    lex = _lexicon(tokenizer, banned)
    rng.shuffle(lex)
    for word, group in lex[:N_LEXICON]:
        plans = rng.sample(group, 2)
        text = rng.choice(FIRST_LINES).format(w=word) + "\n" + rng.choice(SECOND_LINES)
        items.append({"text": text, "line_end": word, "plans": plans})
    items.extend(battery_word_couplets(seed))
    held_out = {str(p.get("text")) for p in battery_words()[1]}
    items = [it for it in items if it["text"] not in held_out]  # battery prompts stay unseen
    for it in items:
        it["explanation"] = explanation_for(it["line_end"], it["plans"])
    return items


def make_eval_items(tokenizer, seed: int = SEED) -> list[dict[str, Any]]:  # noqa: ANN001
    """Held-out prompts: the battery prompts plus template couplets over battery line-end words."""
    from steercmp.rhymes import rhyme_group, single_token_filter

    words, prompts = battery_words()
    rng = random.Random(f"nla-mini-eval:{seed}")
    single = single_token_filter(tokenizer)
    items = []
    ends = []
    for p in prompts:
        first = str(p["text"]).split("\n", 1)[0]
        end = first.split()[-1].strip(".,;:!?\"'()").lower()
        original = [str(w).lower() for w in (p.get("families") or {}).get("original", [])]
        items.append({"text": p["text"], "line_end": end, "plans": original, "id": p.get("id")})
        ends.append(end)
    if not ends:
        ends = ["bird", "fire", "hill", "night", "rain", "shore", "snow", "stream"]
    for i in range(N_EVAL_EXTRA):
        end = ends[i % len(ends)]
        group = rhyme_group(end, vocab_filter=single)
        text = rng.choice(FIRST_LINES).format(w=end) + "\n" + rng.choice(SECOND_LINES)
        items.append({"text": text, "line_end": end, "plans": group[:8]})
    if len(items) > N_EVAL_MAX:  # keep every kind: battery prompts first, template couplets last
        keep = N_EVAL_MAX - min(N_EVAL_EXTRA, N_EVAL_MAX // 3)
        items = items[:keep] + items[len(items) - (N_EVAL_MAX - keep):]
    return items


# --------------------------------------------------------------------------- model pieces


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _capture(block: torch.nn.Module, store: list[torch.Tensor], stop: bool = True) -> Iterator[None]:
    def hook(_mod, _inp, out):
        store.append(out[0] if isinstance(out, tuple) else out)
        if stop:
            raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _block_output(model, layer: int, **inputs) -> torch.Tensor:  # noqa: ANN001
    """Output of decoder block ``layer`` (stops the forward pass there)."""
    from steercmp.models import decoder_layers

    store: list[torch.Tensor] = []
    with _capture(decoder_layers(model)[layer], store), contextlib.suppress(_Stop):
        model(**inputs, use_cache=False)
    return store[0]


@contextlib.contextmanager
def _top_blocks(decoder, start: int) -> Iterator[None]:  # noqa: ANN001
    """Temporarily make ``decoder`` run only blocks ``start..`` (inputs_embeds = block input)."""
    layers, cfg = decoder.layers, decoder.config
    saved = (cfg.num_hidden_layers, list(cfg.layer_types))
    decoder.layers = torch.nn.ModuleList(list(layers)[start:])
    cfg.num_hidden_layers = len(decoder.layers)
    cfg.layer_types = saved[1][start:]
    try:
        yield
    finally:
        decoder.layers = layers
        cfg.num_hidden_layers, cfg.layer_types = saved


def _pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(list(s))
        mask[i, :len(s)] = 1
    return ids, mask


def extract_gold(lm, items: Sequence[dict[str, Any]], bar=None, batch: int = 16  # noqa: ANN001
                 ) -> torch.Tensor:
    """Layer-12 output at the first line break of each item's text, fp32 ``[n, d]``."""
    from steercmp.positions import find_position

    tok = lm.tokenizer
    out = []
    for s in range(0, len(items), batch):
        chunk = items[s:s + batch]
        seqs = [tok(it["text"])["input_ids"] for it in chunk]
        pos = [find_position(tok, ids, it["text"], "first_line_break") for ids, it in zip(seqs, chunk, strict=True)]
        ids, mask = _pad(seqs, tok.pad_token_id or 0)
        with torch.no_grad():
            h = _block_output(lm.model, LAYER, input_ids=ids, attention_mask=mask)
        out.append(h[torch.arange(len(chunk)), torch.tensor(pos)].float())
        if bar is not None:
            bar.update(len(chunk))
    return torch.cat(out)


# --------------------------------------------------------------------------- build


def build_mini_pair(root: Path, *, progress: bool = True, seed: int = SEED) -> dict[str, Any]:
    """Build the miniature pair into ``root/{av,ar}`` and write ``root/quality.json``."""
    from tqdm.auto import tqdm

    from steercmp.models import load_base_model

    from .meta import SIDECAR_NAME, VALUE_HEAD_NAME

    t0 = time.time()
    torch.manual_seed(seed)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "av").mkdir(parents=True)
    (tmp / "ar").mkdir(parents=True)
    log: dict[str, Any] = {"seed": seed, "layer": LAYER, "base": EMBEDDED_ID}

    lm = load_base_model(EMBEDDED_ID, dtype="float32", device="cpu", progress=progress)
    tok, model = lm.tokenizer, lm.model
    d = lm.d_model
    battery_vocab, _ = battery_words()
    banned: set[str] = set()  # words are not held out; battery prompt texts are (see below)
    train = make_training_couplets(tok, banned, seed)
    log["battery_words_in_training"] = len(battery_vocab)
    evals = make_eval_items(tok, seed)
    log.update(n_train=len(train), n_eval=len(evals), held_out_words=sorted(banned))
    bar = tqdm(total=len(train) + len(evals), desc="nla mini: layer-12 activations",
               disable=not progress)
    gold_train = extract_gold(lm, train, bar)
    gold_eval = extract_gold(lm, evals, bar)
    bar.close()
    scale = float(gold_train.norm(dim=-1).mean())

    # ---- the AV tokenizer: the base tokenizer plus a chat template and an injection char
    tok.chat_template = CHAT_TEMPLATE
    inj = next(c for c in INJECTION_CANDIDATES
               if len(tok.encode(c, add_special_tokens=False)) == 1)
    inj_id = tok.encode(inj, add_special_tokens=False)[0]
    content = AV_TEMPLATE.format(injection_char=inj)
    from .checkpoint import as_id_list

    prompt = as_id_list(tok.apply_chat_template([{"role": "user", "content": content}],
                                                tokenize=True, add_generation_prompt=True))
    site = prompt.index(inj_id)
    av_meta = {
        "kind": "nla_model", "role": "av", "d_model": d, "base_model": EMBEDDED_ID,
        "extraction_layer_index": LAYER, "mini_version": MINI_NAME,
        "extraction": {"injection_scale": round(scale, 3), "mse_scale": "sqrt_d_model"},
        "tokens": {"injection_char": inj, "injection_token_id": inj_id,
                   "injection_left_neighbor_id": prompt[site - 1],
                   "injection_right_neighbor_id": prompt[site + 1]},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
    }

    # ---- AV: fine-tune blocks 13..17 on cached block-12 outputs, restricted vocabulary
    end_id = tok.convert_tokens_to_ids("<end_of_turn>")
    targets = [tok.encode(f"<explanation>{it['explanation']}</explanation>",
                          add_special_tokens=False) + [end_id] for it in train]
    sub_ids = sorted({t for tt in targets for t in tt})
    held = {tid for w in banned for tid in tok.encode(" " + w, add_special_tokens=False)}
    rng = random.Random(f"nla-mini-neg:{seed}")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    negatives = [t for t in rng.sample(range(vocab_size), N_NEGATIVES) if t not in held]
    sub_ids = sorted(set(sub_ids) | set(negatives))
    remap = torch.full((vocab_size,), -100, dtype=torch.long)
    remap[torch.tensor(sub_ids)] = torch.arange(len(sub_ids))
    embed_w = model.get_input_embeddings().weight.detach()
    w_sub = embed_w[torch.tensor(sub_ids)].clone()

    decoder = model.get_decoder()
    embed = model.get_input_embeddings()
    base_prompt = embed(torch.tensor([prompt])).detach()[0]
    n_prompt = len(prompt)
    cached: list[torch.Tensor] = []
    bar = tqdm(total=len(train), desc="nla mini: AV inputs", disable=not progress)
    order = list(range(len(train)))
    for s in range(0, len(train), AV_BATCH):
        idx = order[s:s + AV_BATCH]
        seqs = [targets[i] for i in idx]
        ids, _ = _pad(seqs, tok.pad_token_id or 0)
        with torch.no_grad():
            emb = torch.cat([base_prompt.expand(len(idx), -1, -1), embed(ids)], dim=1)
            v = gold_train[idx]
            emb[:, site] = v / v.norm(dim=-1, keepdim=True) * scale
            h = _block_output(model, TRAIN_FROM_BLOCK - 1, inputs_embeds=emb)
        cached.extend(h[i, : n_prompt + len(seqs[i])].clone() for i in range(len(idx)))
        bar.update(len(idx))
    bar.close()

    trainable = [p for blk in list(decoder.layers)[TRAIN_FROM_BLOCK:] for p in blk.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=AV_LR, weight_decay=0.0)
    steps_total = AV_EPOCHS * math.ceil(len(train) / AV_BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps_total))
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=steps_total, desc="nla mini: train AV", disable=not progress)
    losses = []
    model.train()
    for _ in range(AV_EPOCHS):
        perm = torch.randperm(len(train), generator=g).tolist()
        for s in range(0, len(perm), AV_BATCH):
            idx = perm[s:s + AV_BATCH]
            width = max(cached[i].shape[0] for i in idx)
            x = torch.zeros(len(idx), width, d)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            for j, i in enumerate(idx):
                n = cached[i].shape[0]
                x[j, :n] = cached[i]
                labels[j, n_prompt - 1: n - 1] = remap[torch.tensor(targets[i])]
            with _top_blocks(decoder, TRAIN_FROM_BLOCK):
                hid = decoder(inputs_embeds=x, use_cache=False).last_hidden_state
            sel = labels != -100
            logits = hid[sel] @ w_sub.T
            loss = torch.nn.functional.cross_entropy(logits, labels[sel])
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
    log["av_loss_final"] = sum(losses[-10:]) / max(1, len(losses[-10:]))
    del cached
    model.save_pretrained(tmp / "av", safe_serialization=True)
    tok.save_pretrained(tmp / "av")
    (tmp / "av" / SIDECAR_NAME).write_text(yaml.safe_dump(av_meta, allow_unicode=True,
                                                          sort_keys=False))
    lm.unload()
    del model, decoder, embed

    # ---- AR: base truncated to blocks 0..12, value head by ridge regression
    lm = load_base_model(EMBEDDED_ID, dtype="float32", device="cpu", progress=False)
    tok = lm.tokenizer
    dec = lm.model.get_decoder()
    dec.layers = torch.nn.ModuleList(list(dec.layers)[: LAYER + 1])
    cfg = lm.model.config
    cfg.num_hidden_layers = LAYER + 1
    cfg.layer_types = list(cfg.layer_types)[: LAYER + 1]
    lm.model.save_pretrained(tmp / "ar", safe_serialization=True)
    tok.save_pretrained(tmp / "ar")
    suffix = common_suffix(tok(AR_TEMPLATE.format(explanation=e))["input_ids"]
                           for e in ("The line ends with x.", "planning dream or seem", "-eam"))
    ar_meta = {
        "kind": "nla_model", "role": "ar", "d_model": d, "base_model": EMBEDDED_ID,
        "extraction_layer_index": LAYER, "mini_version": MINI_NAME,
        "ar": {"num_hidden_layers": LAYER},
        "extraction": {"injection_scale": None, "mse_scale": "sqrt_d_model"},
        "tokens": {"critic_suffix_ids": suffix},
        "prompt_templates": {"av": AV_TEMPLATE, "ar": AR_TEMPLATE},
    }
    (tmp / "ar" / SIDECAR_NAME).write_text(yaml.safe_dump(ar_meta, sort_keys=False))
    save_file({"weight": torch.eye(d)}, str(tmp / "ar" / VALUE_HEAD_NAME))
    lm.unload()

    from .ar import ActivationReconstructor
    from .fidelity import normalise

    ar = ActivationReconstructor.load(tmp / "ar")
    bar = tqdm(total=1, desc="nla mini: AR features", disable=not progress)
    feats = ar.features([it["explanation"] for it in train])
    bar.update(1)
    bar.close()
    target = normalise(gold_train)
    n_fit = int(len(train) * 0.85)
    best = None
    for lam in (1e-2, 1e-1, 1.0, 10.0, 100.0):
        w = _ridge(feats[:n_fit], target[:n_fit], lam)
        pred = feats[n_fit:] @ w
        mse = float(((normalise(pred) - target[n_fit:]) ** 2).mean())
        if best is None or mse < best[0]:
            best = (mse, lam)
    lam = best[1]
    w = _ridge(feats, target, lam)
    # the ridge fits unit-scale (sqrt(d)-normalised) targets; a released AR outputs vectors in the
    # activation's own scale, and deltas AR(edited) - AR(original) are injected raw, so rescale the
    # head to the mean gold norm (fidelity is measured after normalising, so it is unchanged)
    w = w * activation_scale(gold_train)
    save_file({"weight": w.T.contiguous()}, str(tmp / "ar" / VALUE_HEAD_NAME))
    log["ar_ridge_lambda"] = lam
    log["ar_output_scale"] = activation_scale(gold_train)
    ar.unload()

    # ---- quality on held-out prompts, through the released-layout loaders
    quality = evaluate(tmp / "av", tmp / "ar", evals, gold_eval, progress=progress, seed=seed)
    log.update(quality)
    log["build_seconds"] = round(time.time() - t0, 1)
    (tmp / "quality.json").write_text(json.dumps(log, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    if progress:
        print(f"nla mini pair built in {log['build_seconds']:.0f} s -> {root}\n"
              f"  held-out AR fve_nrm (from AV explanations): {quality['fve_nrm_av']:.3f}"
              f" (templated: {quality['fve_nrm_template']:.3f})\n"
              f"  AV names the rhyme word or an original plan word: {quality['name_rate']:.1%}")
    return log


def activation_scale(gold: torch.Tensor) -> float:
    """Factor from sqrt(d)-normalised vectors to the activations' mean norm."""
    return float(gold.norm(dim=-1).mean()) / math.sqrt(gold.shape[-1])


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


def evaluate(av_dir: Path, ar_dir: Path, items: Sequence[dict[str, Any]], gold: torch.Tensor,
             *, progress: bool = True, seed: int = SEED, n: int = 2) -> dict[str, Any]:
    """Held-out quality: AV naming rate and AR fve_nrm from the AV's own explanations."""
    from tqdm.auto import tqdm

    from .ar import ActivationReconstructor
    from .av import ActivationVerbalizer
    from .fidelity import baseline_variance, fidelity
    from .select import mentions

    av = ActivationVerbalizer.load(av_dir)
    rows = []
    bar = tqdm(total=len(items) * n, desc="nla mini: held-out explanations", disable=not progress)
    flat = [(i, s) for i in range(len(items)) for s in range(n)]
    for start in range(0, len(flat), 16):
        chunk = flat[start:start + 16]
        gens = [torch.Generator().manual_seed(seed * 1000 + i * 10 + s) for i, s in chunk]
        outs = av.explain(gold[[i for i, _ in chunk]], generators=gens, temperature=1.0,
                          max_new_tokens=48)
        for (i, s), (expl, _raw, _complete) in zip(chunk, outs, strict=True):
            it = items[i]
            named = bool(mentions(expl, [it["line_end"], *it["plans"]]))
            rows.append({"item": i, "sample": s, "explanation": expl, "named": named})
        bar.update(len(chunk))
    bar.close()
    av.unload()
    ar = ActivationReconstructor.load(ar_dir)
    base = baseline_variance(gold)
    preds = ar.reconstruct([r["explanation"] for r in rows])
    fves = [fidelity(p, gold[r["item"]], base).fve_nrm for p, r in zip(preds, rows, strict=True)]
    tmpl = ar.reconstruct([explanation_for(it["line_end"], it["plans"] or ["?"]) for it in items])
    fves_t = [fidelity(p, gold[i], base).fve_nrm for i, p in enumerate(tmpl)]
    ar.unload()
    for r, f in zip(rows, fves, strict=True):
        r["fve_nrm"] = f
    return {
        "n_eval_prompts": len(items), "samples_per_prompt": n,
        "name_rate": sum(r["named"] for r in rows) / len(rows),
        "fve_nrm_av": sum(fves) / len(fves),
        "fve_nrm_template": sum(fves_t) / len(fves_t),
        "baseline_variance": base,
        "examples": rows[: 2 * n] + rows[-2:],
    }
