"""The Natural Language Autoencoder (NLA) text-edit method and the ``steercmp nla`` commands.

An NLA pair turns a residual vector into an English explanation (the AV) and an explanation back
into a vector (the AR). The method edits the explanation's planning words and injects
``AR(edited) - AR(original)``. See ``shared/reference/nla-checkpoints.md`` for the contract.
"""

from __future__ import annotations

from steercmp.hookspecs import hookimpl


@hookimpl
def register_methods(register) -> None:  # noqa: ANN001
    """Register :class:`~steercmp_plugins.nla.text_edit.NlaTextEdit`."""
    from .text_edit import NlaTextEdit

    register(NlaTextEdit)


@hookimpl
def register_report_sections(register) -> None:  # noqa: ANN001
    """Register the NLA fidelity section and the text-edit panel."""
    from .report_sections import PANEL, SECTION

    register(SECTION)
    register(PANEL)


@hookimpl
def register_commands(register) -> None:  # noqa: ANN001
    """Register ``steercmp nla explain|reconstruct|build-mini``."""
    from .commands import configure, handler

    register("nla", "work with NLA pairs (explain, reconstruct, build-mini)", configure, handler)
