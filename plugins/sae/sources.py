"""Loading SAEs through sae-lens and checking that they read the experiment's layer.

Three sources (see :class:`SaeSource`):

- a sae-lens release and SAE id (``SAE.from_pretrained``; needs the Hugging Face hub), e.g.
  ``gemma-scope-2-12b-it-res-all`` / ``layer_32_width_16k_l0_small`` for the 12B model and
  ``gemma-scope-2-270m-pt-res`` / ``layer_12_width_16k_l0_medium`` for the 270M;
- a local directory in sae-lens' disk format (``cfg.json`` + ``sae_weights.safetensors``,
  ``SAE.load_from_disk``) — the way to use a released SAE where no hub is reachable;
- ``path: embedded``: steercmp's own SAE for the embedded 270M (:mod:`.train`).

Layer convention (shared by steercmp, NLA checkpoints, sae-lens and Gemma Scope 2): "layer K" is
the OUTPUT of decoder block K = ``blocks.K.hook_resid_post`` = ``model.layers.K`` (a forward hook on
the block) = ``hidden_states[K+1]`` = Gemma Scope 2 ``layer_K_*`` (``resid_post`` folders).
``blocks.{K+1}.hook_resid_pre`` is the same tensor and is accepted as layer K.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from steercmp.api import ConfigError, known_model

__all__ = [
    "EMBEDDED_PATH",
    "SaeSource",
    "check_compatible",
    "hook_layer",
    "load_sae",
    "release_entry",
]

EMBEDDED_PATH = "embedded"
_OPT = "methods.sae_features"

# (pattern, offset): layer = int(group 1) + offset
_HOOK_PATTERNS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),
    # HF module paths: model.layers.K, model.model.layers.K, model.language_model.layers.K,
    # model.model.language_model.layers.K, language_model.model.layers.K, layers.K
    (re.compile(r"^(?:(?:model|language_model)\.)*layers\.(\d+)$"), 0),
    # Gemma Scope 2 ids and folders: layer_12_width_16k_l0_medium, resid_post/layer_12_...
    (re.compile(r"^(?:resid_post(?:_all)?/)?layer_(\d+)(?:_|$)"), 0),
)


def _d_model_of(model_id: str, default: int | None) -> int | None:
    """A release's model width from the model catalogue (``default`` when unknown)."""
    info = known_model(model_id)
    return info.d_model if info is not None and info.d_model else default


def hook_layer(name: str | None) -> int | None:
    """The layer (output of block K) a hook name, module path or Gemma Scope id reads, or ``None``
    when the name is not a residual-stream output (e.g. ``hook_mlp_out``, ``attn.hook_z``)."""
    if not name:
        return None
    for pattern, offset in _HOOK_PATTERNS:
        m = pattern.match(name.strip())
        if m:
            return int(m.group(1)) + offset
    return None


def check_compatible(*, hook_name: str | None, d_in: int, layer: int, d_model: int | None,
                     what: str, sae_id: str | None = None) -> None:
    """Raise :class:`ConfigError` unless the SAE reads the output of block ``layer`` with width
    ``d_model``. ``what`` names the SAE in the message; ``sae_id`` is a fallback for the layer."""
    found = hook_layer(hook_name)
    if found is None and sae_id is not None and not hook_name:
        found = hook_layer(sae_id)
    if found is None:
        raise ConfigError(
            f"SAE {what} reads hook {hook_name!r}, which is not a residual-stream block output",
            where=f"{_OPT}: hook_name",
            fix=f"use an SAE trained on blocks.{layer}.hook_resid_post (= model.layers.{layer})")
    if found != layer:
        raise ConfigError(
            f"SAE {what} reads layer {found} ({hook_name or sae_id}) but the experiment's layer is "
            f"{layer} (output of block {layer} = blocks.{layer}.hook_resid_post = hidden_states[{layer + 1}])",
            where=f"{_OPT}: layer",
            fix=f"pick an SAE for layer {layer} or set the experiment's layer to {found}")
    if d_model is not None and int(d_in) != int(d_model):
        raise ConfigError(
            f"SAE {what} has d_in {d_in} but the model's hidden size is {d_model}",
            where=f"{_OPT}: d_in",
            fix="use an SAE trained on this model")


def release_entry(release: str, sae_id: str) -> tuple[Any, str]:
    """sae-lens' directory entry for ``release`` and the folder of ``sae_id`` (offline lookup)."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        near = [r for r in directory if release.split("-res")[0] in r][:5]
        raise ConfigError(f"unknown sae-lens release {release!r}", where=f"{_OPT}: release",
                          fix=f"use a release from sae-lens' pretrained_saes.yaml{', e.g. ' + ', '.join(near) if near else ''}")
    entry = directory[release]
    if sae_id not in entry.saes_map:
        near = [s for s in entry.saes_map if s.startswith(sae_id.split("_width")[0] + "_")][:6]
        raise ConfigError(f"release {release!r} has no SAE id {sae_id!r}", where=f"{_OPT}: sae_id",
                          fix=f"use one of {near or sorted(entry.saes_map)[:6]}")
    return entry, entry.saes_map[sae_id]


def _width_from_id(sae_id: str) -> int | None:
    m = re.search(r"width_(\d+)([km])", sae_id)
    if not m:
        return None
    return int(m.group(1)) * (1024 if m.group(2) == "k" else 1024 * 1024)


@attrs.frozen
class SaeSource:
    """Where the SAE comes from: ``kind`` is ``release``, ``path`` or ``embedded``."""

    kind: str
    release: str | None = None
    sae_id: str | None = None
    path: str | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SaeSource:
        """Read ``release`` + ``sae_id`` or ``path`` (``embedded`` = steercmp's own SAE; the default)."""
        release, sae_id, path = options.get("release"), options.get("sae_id"), options.get("path")
        if path is not None and (release is not None or sae_id is not None):
            raise ConfigError("give either path or release + sae_id, not both", where=_OPT,
                              fix="remove one of them")
        if release is not None or sae_id is not None:
            if not (isinstance(release, str) and isinstance(sae_id, str) and release and sae_id):
                raise ConfigError("release and sae_id go together", where=f"{_OPT}: release",
                                  fix="set both, e.g. release: gemma-scope-2-270m-pt-res, "
                                      "sae_id: layer_12_width_16k_l0_medium")
            return cls("release", release=release, sae_id=sae_id)
        if path is None or str(path) == EMBEDDED_PATH:
            return cls("embedded")
        return cls("path", path=str(path))

    def describe(self) -> str:
        if self.kind == "release":
            return f"{self.release}/{self.sae_id}"
        if self.kind == "path":
            return str(self.path)
        return "embedded:gemma-3-270m-L12"

    def expected(self, d_model: int | None = None) -> dict[str, Any]:
        """What is known without loading: ``hook_name``, ``d_in``, ``d_sae`` (any may be None).

        Releases are looked up in sae-lens' offline directory; local directories read ``cfg.json``.
        """
        if self.kind == "embedded":
            from steercmp_plugins.sae.train import TrainSettings

            s = TrainSettings()
            return {"hook_name": f"model.layers.{s.layer}", "d_in": 640, "d_sae": s.d_sae}
        if self.kind == "release":
            assert self.release and self.sae_id
            entry, folder = release_entry(self.release, self.sae_id)
            hook = None
            if "resid_post" in folder or "hook_resid_post" in folder:
                layer = hook_layer(self.sae_id)
                hook = f"blocks.{layer}.hook_resid_post" if layer is not None else None
            else:
                hook = folder  # not a residual-stream SAE: check_compatible names it
            return {"hook_name": hook, "d_in": _d_model_of(entry.model, d_model),
                    "d_sae": _width_from_id(self.sae_id), "model": entry.model}
        cfg = _read_cfg(Path(str(self.path)).expanduser())
        return {"hook_name": _cfg_hook(cfg), "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae")}

    def check(self, layer: int, d_model: int | None) -> None:
        """Config-time check (no weights loaded): layer and d_in against the experiment."""
        exp = self.expected(d_model)
        if self.kind == "embedded" and d_model is not None and d_model != exp["d_in"]:
            raise ConfigError(
                f"path: embedded is steercmp's SAE for the embedded Gemma 3 270M (d_in 640) but the "
                f"model's hidden size is {d_model}", where=f"{_OPT}: path",
                fix="for another model give release + sae_id or a local SAE directory")
        check_compatible(hook_name=exp["hook_name"], d_in=exp["d_in"] or (d_model or 0),
                         layer=layer, d_model=d_model if exp["d_in"] else None,
                         what=self.describe(), sae_id=self.sae_id)


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg = path / "cfg.json"
    if not path.is_dir() or not cfg.exists():
        raise ConfigError(f"{str(path)!r} is not an SAE directory in sae-lens' disk format",
                          where=f"{_OPT}: path",
                          fix="point path at a directory with cfg.json and sae_weights.safetensors "
                              "(sae.save_model(DIR) writes one), or use path: embedded")
    return json.loads(cfg.read_text())


def _cfg_hook(cfg: dict[str, Any]) -> str | None:
    meta = cfg.get("metadata") or {}
    return meta.get("hook_name") or cfg.get("hook_name")


def release_files(source: SaeSource) -> tuple[str, tuple[str, ...]]:
    """The HF repo of a release SAE and the files sae-lens reads from it (Gemma Scope layout:
    ``<folder>/params.safetensors`` and ``<folder>/config.json``)."""
    assert source.release and source.sae_id
    entry, folder = release_entry(source.release, source.sae_id)
    return entry.repo_id, (f"{folder}/params.safetensors", f"{folder}/config.json")


def origin(source: SaeSource) -> str:
    """Where the SAE comes from, without loading it (``steercmp plan``); ConfigError when it
    cannot be had offline."""
    from steercmp.api import hub_origin

    if source.kind == "embedded":
        from steercmp_plugins.sae.train import BUILD_ESTIMATE, embedded_sae_dir, embedded_sae_ready

        return (f"steercmp cache ({embedded_sae_dir()})" if embedded_sae_ready()
                else f"trained on first use into the steercmp cache ({BUILD_ESTIMATE})")
    if source.kind == "path":
        _read_cfg(Path(str(source.path)).expanduser())
        return f"local directory {Path(str(source.path)).expanduser()}"
    repo, files = release_files(source)
    return hub_origin(repo, files, where=f"{_OPT}: release", what=f"SAE {source.describe()} in repo")


@contextmanager
def _shapes_from_cache() -> Iterator[None]:
    """Let sae-lens read a cached Gemma Scope 2 file's tensor shapes from the cache.

    sae-lens (6.x, ``get_safetensors_tensor_shapes``) fetches the shapes with a raw HTTP range
    request that ignores ``HF_HUB_OFFLINE`` and the cache, so a fully cached SAE still fails
    offline. While this is active, a file that is in the cache has its header read locally
    (safetensors); anything else goes to sae-lens' own function unchanged."""
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from safetensors import safe_open

    from steercmp.api import cached_hub_file

    original = loaders.get_safetensors_tensor_shapes

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        path = cached_hub_file(repo_id, filename)
        if path is None:
            return original(repo_id, filename)
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    loaders.get_safetensors_tensor_shapes = shapes
    try:
        yield
    finally:
        loaders.get_safetensors_tensor_shapes = original


def load_sae(source: SaeSource, *, layer: int, d_model: int | None, device: str = "cpu",
             dtype: str = "float32") -> Any:
    """Load the SAE (a sae-lens ``SAE``), check it against the layer and width, and return it."""
    from sae_lens import SAE

    if source.kind == "embedded":
        from steercmp_plugins.sae.train import ensure_embedded_sae

        sae = SAE.load_from_disk(ensure_embedded_sae(), device=device, dtype=dtype)
    elif source.kind == "path":
        path = Path(str(source.path)).expanduser()
        _read_cfg(path)
        sae = SAE.load_from_disk(path, device=device, dtype=dtype)
    else:
        assert source.release and source.sae_id
        release_entry(source.release, source.sae_id)
        from steercmp.api import hub_offline

        if hub_offline():
            origin(source)  # names the missing file instead of a connection error
        try:
            with _shapes_from_cache():
                sae = SAE.from_pretrained(source.release, source.sae_id, device=device, dtype=dtype)
        except Exception as exc:  # network / hub errors come in many types (httpx, requests, OSError)
            first = (str(exc).splitlines() or [""])[0].rstrip()
            raise ConfigError(
                f"cannot load SAE {source.describe()} from the Hugging Face cache or hub "
                f"({type(exc).__name__}: {first}); the hub is probably not reachable from here",
                where=f"{_OPT}: release",
                fix="where the hub is reachable run SAE.from_pretrained(release, sae_id)"
                    ".save_model(DIR), copy DIR here and set path: DIR instead of release/sae_id") from exc
    sae.eval()
    sae.requires_grad_(False)
    check_compatible(hook_name=_cfg_hook(sae.cfg.to_dict()), d_in=int(sae.cfg.d_in), layer=layer,
                     d_model=d_model, what=source.describe(), sae_id=source.sae_id)
    return sae
