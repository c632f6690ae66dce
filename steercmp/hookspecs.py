"""pluggy hook specifications: how plugins hand methods, controls and commands to steercmp.

Every hook is a registration hook. It is called ONCE, when a plugin manager is built by
:func:`steercmp.plugin_manager.build_plugin_manager`, and receives a typed ``register`` callable;
plugins call it with classes instead of returning loose values. Registering a name twice raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "steercmp"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register: Callable[[type], None]) -> None:
    """Called once at plugin-manager build time; call ``register(MethodSubclass)`` for each
    :class:`steercmp.api.Method` the plugin provides. Returns nothing."""


@hookspec
def register_controls(register: Callable[[type], None]) -> None:
    """Called once at plugin-manager build time; call ``register(ControlSubclass)`` for each
    :class:`steercmp.api.Control` the plugin provides. Returns nothing."""


@hookspec
def register_commands(register: Callable[..., Any]) -> None:
    """Called once when the CLI is built; call ``register(name, help, configure, handler)`` to add
    a ``steercmp NAME`` subcommand: ``configure(parser)`` adds arguments and ``handler(args)``
    runs it and returns an exit code. Returns nothing."""
