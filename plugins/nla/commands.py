"""``steercmp nla explain | reconstruct | build-mini``: work with any NLA pair.

A vector file holds one tensor named ``vector`` of shape ``[d_model]`` (safetensors).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from steercmp.api import ConfigError, capture_at, load_base_model, writable_file

from .text_edit import checkpoint_source

VECTOR_KEY = "vector"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="nla_command", required=True, metavar="{explain,reconstruct,build-mini}")
    ex = sub.add_parser("explain", help="explain a vector (or a prompt's activation) with an AV")
    ex.add_argument("--av", required=True, help="AV checkpoint: local dir, HF id or 'mini'")
    src = ex.add_mutually_exclusive_group(required=True)
    src.add_argument("--vector", help="safetensors file with a [d_model] tensor named 'vector'")
    src.add_argument("--prompt", help="text whose activation to explain (with --position/--base/--layer)")
    ex.add_argument("--position", default="first_line_break",
                    help="position rule: first_line_break, last, token:N, regex:PAT")
    ex.add_argument("--base", default="embedded:gemma-3-270m", help="base model for --prompt")
    ex.add_argument("--layer", type=int, help="layer K (output of block K) for --prompt")
    ex.add_argument("--n", type=int, default=1, help="explanations to sample")
    ex.add_argument("--temperature", type=float, default=1.0)
    ex.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    ex.add_argument("--max-new-tokens", type=int, default=200)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--json", action="store_true", help="print one JSON object")
    ex.add_argument("--ar", help="AR checkpoint: also print each explanation's fidelity")
    ex.add_argument("--dtype", default="float32")
    ex.add_argument("--device", default="cpu")
    rc = sub.add_parser("reconstruct", help="reconstruct a vector from text with an AR")
    rc.add_argument("--ar", required=True, help="AR checkpoint: local dir, HF id or 'mini'")
    rc.add_argument("--text", required=True)
    rc.add_argument("--out", help="write the vector to this safetensors file (key 'vector')")
    rc.add_argument("--dtype", default="float32")
    rc.add_argument("--device", default="cpu")
    bm = sub.add_parser("build-mini", help="build the miniature NLA pair for the embedded model")
    bm.add_argument("--force", action="store_true", help="rebuild even if cached")
    bm.add_argument("--position", default="last", choices=("first_line_break", "last"),
                    help="where the pair reads layer 12: last (the rhyme slot, the embedded default's site) or "
                         "first_line_break (the research note's planning position)")


def read_vector(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:
        raise ConfigError(f"cannot read {path!r}: {exc}", where="--vector",
                          fix="pass a safetensors file") from None
    if VECTOR_KEY not in tensors:
        raise ConfigError(f"{path!r} has no tensor named 'vector' (found {sorted(tensors)})",
                          where="--vector", fix="store the vector under the key 'vector'")
    vec = tensors[VECTOR_KEY]
    if vec.ndim != 1:
        raise ConfigError(f"'vector' has shape {list(vec.shape)}, expected [d_model]",
                          where="--vector", fix="store one [d_model] vector")
    return vec.float()


def prompt_activation(text: str, rule: str, base: str, layer: int | None,
                      dtype: str, device: str) -> torch.Tensor:
    if layer is None:
        raise ConfigError("--prompt needs --layer", where="--layer", fix="pass the NLA's layer K")
    lm = load_base_model(base, dtype=dtype, device=device)
    try:
        if not 0 <= layer < lm.num_layers:
            raise ConfigError(f"layer {layer} is outside 0..{lm.num_layers - 1}", where="--layer",
                              fix="pick a layer of the base model")
        return capture_at(lm, layer, [text], [rule])[0]
    finally:
        lm.unload()


def _explain(args: argparse.Namespace) -> int:
    from .ar import ActivationReconstructor
    from .av import ActivationVerbalizer
    from .fidelity import fidelity

    if args.vector:
        vec = read_vector(args.vector)
    else:
        vec = prompt_activation(args.prompt, args.position, args.base, args.layer,
                                args.dtype, args.device)
    av = ActivationVerbalizer.load(checkpoint_source(args.av, "av"), dtype=args.dtype, device=args.device)
    av.meta.check_compatible(d_model=int(vec.shape[0]),
                             layer=args.layer if args.prompt else None)
    gens = [torch.Generator().manual_seed(args.seed * 100003 + i) for i in range(args.n)]
    outs = av.explain(vec[None].expand(args.n, -1), generators=None if args.greedy else gens,
                      temperature=args.temperature, greedy=args.greedy,
                      max_new_tokens=args.max_new_tokens)
    av.unload()
    rows: list[dict[str, Any]] = [{"sample": i, "explanation": e, "raw": r, "complete": c}
                                  for i, (e, r, c) in enumerate(outs)]
    if args.ar:
        ar = ActivationReconstructor.load(checkpoint_source(args.ar, "ar"), dtype=args.dtype, device=args.device)
        recon = ar.reconstruct([r["explanation"] for r in rows])
        ar.unload()
        for r, p in zip(rows, recon, strict=True):
            f = fidelity(p, vec, float("nan"))
            r.update(mse_nrm=f.mse_nrm, cosine=f.cosine)
    if args.json:
        print(json.dumps({"av": args.av, "ar": args.ar, "explanations": rows}, indent=2))
    else:
        for r in rows:
            extra = (f"  [mse_nrm {r['mse_nrm']:.4f}, cosine {r['cosine']:.4f}]"
                     if "mse_nrm" in r else "")
            print(f"[{r['sample']}] {r['explanation']}{extra}")
    return 0


def _reconstruct(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from .ar import ActivationReconstructor

    if args.out:
        writable_file(args.out, where="--out")
    ar = ActivationReconstructor.load(checkpoint_source(args.ar, "ar"), dtype=args.dtype, device=args.device)
    vec = ar.reconstruct([args.text])[0].contiguous()
    ar.unload()
    if args.out:
        save_file({VECTOR_KEY: vec}, args.out)
        print(f"wrote {args.out} (vector [{vec.shape[0]}], norm {float(vec.norm()):.4g})")
    else:
        print(json.dumps({"norm": float(vec.norm()), "vector": vec.tolist()}))
    return 0


def _build_mini(args: argparse.Namespace) -> int:
    from .mini import ensure_mini_pair, is_built, mini_dir
    from .mini.build import quality_lines

    root = mini_dir(args.position)
    cached = not args.force and is_built(root, args.position)
    av, ar = ensure_mini_pair(progress=True, force=args.force, position=args.position)
    # a build prints its own quality summary; a cached pair's is read back
    summary = f"{quality_lines(json.loads((root / 'quality.json').read_text()), root)}\n" if cached else ""
    print(f"AV: {av}\nAR: {ar}\n{summary}saved: {root / 'quality.json'}")
    return 0


def handler(args: argparse.Namespace) -> int:
    command = getattr(args, "nla_command", None)
    try:
        if command == "explain":
            return _explain(args)
        if command == "reconstruct":
            return _reconstruct(args)
        if command == "build-mini":
            return _build_mini(args)
    except ConfigError:
        raise
    print(f"unknown nla command {command!r}", file=sys.stderr)
    return 2
