"""SAE-feature steering through sae-lens (the ``sae_features`` method).

Modules: :mod:`.load` (sae-lens releases, local directories, the embedded SAE; layer and width
checks), :mod:`.train` (steercmp's own SAE for the embedded 270M), :mod:`.corpus` (its generated
training text), :mod:`.select` (feature-selection rules) and :mod:`.method` (the method).
"""

from __future__ import annotations

from steercmp.hookspecs import hookimpl


@hookimpl
def register_methods(register):  # noqa: ANN001 - pluggy passes the registrar
    """Register :class:`~steercmp_plugins.sae.features.SaeFeatures`."""
    from steercmp_plugins.sae.features import SaeFeatures

    register(SaeFeatures)
