"""Every bar goes through ``steercmp.api.progress_bar``: ``--no-progress`` (TQDM_DISABLE, set before
tqdm is imported) silences it even where a builder asks for bars, and ``enabled=False`` always does."""

from __future__ import annotations

import os
import subprocess
import sys

CHECK = ("from steercmp.api import progress_bar; "
         "print(progress_bar(range(2), enabled=True).disable, progress_bar(range(2), enabled=False).disable)")


def run(env_disable: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    if env_disable:
        env["TQDM_DISABLE"] = "1"
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_the_environment_silences_an_enabled_bar():
    assert run(env_disable=True) == ["True", "True"]
    assert run(env_disable=False) == ["False", "True"]
