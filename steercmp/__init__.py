"""steercmp: compare activation-steering methods on one battery, one injection, one score."""

import os
from importlib.metadata import PackageNotFoundError, version

#: Bounds on the CPU matmul libraries' per-shape caches, set before the first kernel runs (both
#: read their variable lazily). Unbounded by default (1024 entries each), a run that feeds many
#: distinct shapes (every batch size and sequence length of scoring and sampling) keeps ~0.5 MiB
#: per shape in the C heap: 0.43 GiB of the embedded run's peak, never freed. ideep's cache
#: (``LRU_CACHE_CAPACITY``) costs nothing to shrink. oneDNN's primitive cache was first kept at 256
#: entries, since re-creating a primitive is slow in a probe that cycles many shapes; on the
#: embedded run 32 entries peak 0.19-0.23 GiB lower in every sampling stage and take the same time
#: (docs/scaling.md, "kernel caches" and the seventh session). A value the user has set wins.
KERNEL_CACHE_LIMITS = {"LRU_CACHE_CAPACITY": "16", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "32"}
for _name, _value in KERNEL_CACHE_LIMITS.items():
    os.environ.setdefault(_name, _value)

try:
    __version__ = version("steercmp")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

__all__ = ["KERNEL_CACHE_LIMITS", "__version__"]
