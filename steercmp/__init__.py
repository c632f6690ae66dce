"""steercmp: compare activation-steering methods on one battery, one injection, one score."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("steercmp")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
