"""The plugin authors' conformance kit: check a method or control from any pytest suite.

One line in a plugin's own tests::

    import steercmp.testing

    def test_conformance():
        steercmp.testing.check_method(MyMethod)

:func:`check_method` builds a tiny random-weight Gemma 3 model from a config, the kit's
four-prompt battery (one the positive control must drop) and a :class:`TestRuntime`, then runs the method through the runner's own
proposal check and the shared scorer (see :mod:`steercmp.testing.checks` for the list of checks).
The tiny builders (:func:`tiny_model`, :func:`tiny_tokenizer`, :func:`tiny_lm`, ...) serve any
test that needs a model in milliseconds.
"""

from steercmp.testing.checks import KitSetup, MethodReport, check_control, check_method
from steercmp.testing.memory_runtime import ConformanceError, TestRuntime
from steercmp.testing.models import (
    COUPLET_BATTERY,
    COUPLET_WORDS,
    KIT_SPLITS,
    TINY_BATTERY,
    battery_vocabulary,
    couplet_tokenizer,
    save_tiny_checkpoint,
    tiny_battery,
    tiny_config,
    tiny_contexts,
    tiny_experiment,
    tiny_lm,
    tiny_model,
    tiny_tokenizer,
    words_of,
    write_tiny_experiment,
)
from steercmp.testing.running import run_experiment

__all__ = [
    "COUPLET_BATTERY",
    "COUPLET_WORDS",
    "ConformanceError",
    "KIT_SPLITS",
    "KitSetup",
    "MethodReport",
    "TINY_BATTERY",
    "TestRuntime",
    "battery_vocabulary",
    "check_control",
    "check_method",
    "couplet_tokenizer",
    "run_experiment",
    "save_tiny_checkpoint",
    "tiny_battery",
    "tiny_config",
    "tiny_contexts",
    "tiny_experiment",
    "tiny_lm",
    "tiny_model",
    "tiny_tokenizer",
    "words_of",
    "write_tiny_experiment",
]
