"""pluggy hook specifications: how plugins hand methods, controls, report sections and
commands to steercmp.

Every hook is a registration hook and receives a typed ``register`` callable; plugins call it
with classes or objects instead of returning loose values. Registering a name twice raises.
Methods and controls register when a plugin manager is built
(:func:`steercmp.plugin_manager.build_plugin_manager`); report sections each time a report is
written; commands when the CLI is built.
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
def register_report_sections(register: Callable[[Any], None]) -> None:
    """Called once each time a report is written; call ``register(ReportSection(...))`` for each
    :class:`steercmp.api.ReportSection` (a chart and tables built from the run's data) the plugin
    adds after the core sections. Returns nothing."""


@hookspec
def register_commands(register: Callable[..., Any]) -> None:
    """Called once when the CLI is built; call ``register(name, help, configure, handler)`` to add
    a ``steercmp NAME`` subcommand: ``configure(parser)`` adds arguments and ``handler(args)``
    runs it and returns an exit code. Returns nothing."""
