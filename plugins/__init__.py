"""steercmp's built-in plugins, importable as ``steercmp_plugins``."""
