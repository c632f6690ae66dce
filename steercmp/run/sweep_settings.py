"""What the score and match stages read of an experiment, and nothing more.

The stages below the runner take a :class:`SweepSettings` (and the model's load settings), not
the parsed :class:`~steercmp.config.Experiment`: the experiment object stops at the runner, so a
change to the config's shape reaches one place (issue 21's "path of the experiment object")."""

from __future__ import annotations

import attrs

from steercmp.config import Experiment


@attrs.frozen
class SweepSettings:
    """The sweep's grid (``alphas`` x ``scalings``), where it injects (``layer``), how prompts are
    read (``chat_template``), the seed every control's generator derives from, the scoring batch
    size, and the dose-matching settings (``random_draws`` per shared control, ``max_kl`` the
    fixed budget or ``None`` for the positive control's own)."""

    layer: int
    seed: int
    alphas: tuple[float, ...]
    scalings: tuple[str, ...]
    chat_template: bool
    batch_size: int | str
    random_draws: int
    max_kl: float | None

    @classmethod
    def of(cls, experiment: Experiment) -> SweepSettings:
        return cls(layer=experiment.layer, seed=experiment.seed, alphas=tuple(experiment.alphas),
                   scalings=tuple(experiment.scalings), chat_template=experiment.model.chat_template,
                   batch_size=experiment.batch_size, random_draws=experiment.decision_random_draws,
                   max_kl=experiment.decision_max_kl)
