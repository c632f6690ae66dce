"""The commands behind ``steercmp``: each turns parsed arguments into work and an exit code."""
