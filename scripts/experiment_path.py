"""The path of the experiment object through a run, measured (issue 21): which functions receive
the parsed ``Experiment`` as an argument, in how many modules, and how often the path comes back
into a module it had already left.

It runs ``steercmp run`` in-process (the CLI's own ``main``) on the kit's tiny checkpoint and
three-couplet battery with ``unembed_direction`` and the default controls, under
``sys.setprofile``. Every Python call whose arguments (``self`` aside) hold an ``Experiment``
instance counts:

- *functions*: distinct functions receiving it; *call sites*: distinct ``caller file:line ->
  function`` pairs;
- *modules*: distinct modules of those functions;
- with ``--via-self``, methods of an object holding it in an attribute (``self.experiment``)
  count too;
- *returns*: along the run's sequence of receiving calls (consecutive calls in one module
  collapsed), each step into a module the path had been in before and left.

    python scripts/experiment_path.py [--show]

Runs against any checkout whose ``steercmp.testing`` has ``save_tiny_checkpoint`` and
``write_tiny_experiment``: run it in a worktree of an older commit to compare.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any


def _holds_experiment(frame: FrameType, experiment_type: type, via_self: bool) -> bool:
    """An argument is the experiment (or, with ``via_self``, an attribute of ``self`` is)."""
    code = frame.f_code
    n = code.co_argcount + code.co_kwonlyargcount
    names = [v for v in code.co_varnames[:n] if v not in ("self", "cls")]
    if any(isinstance(frame.f_locals.get(v), experiment_type) for v in names):
        return True
    owner = frame.f_locals.get("self") if via_self and n else None
    attrs = getattr(owner, "__dict__", None) or {}
    return any(isinstance(v, experiment_type) for v in attrs.values())


def trace_run(via_self: bool = False) -> list[tuple[str, str, str]]:
    """``(module, function, caller site)`` of every call that received the experiment, in order
    (with ``via_self``, also every method of an object that holds it)."""
    import pluggy

    from steercmp import cli
    from steercmp.config import Experiment
    from steercmp.testing import (
        COUPLET_BATTERY,
        battery_vocabulary,
        save_tiny_checkpoint,
        write_tiny_experiment,
    )

    calls: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = [*battery_vocabulary(COUPLET_BATTERY),
                 *(w for p in COUPLET_BATTERY["prompts"] for w in p["text"].lower().replace(",", " ").split())]
        model = save_tiny_checkpoint(root / "model", words=words)
        exp = write_tiny_experiment(root / "exp", model)

        def profile(frame: FrameType, event: str, _arg: Any) -> None:
            if event != "call" or not frame.f_globals.get("__name__", "").startswith(("steercmp", "plugins")):
                return
            if _holds_experiment(frame, Experiment, via_self):
                caller = frame.f_back
                site = f"{caller.f_code.co_filename}:{caller.f_lineno}" if caller else "?"
                calls.append((frame.f_globals["__name__"], frame.f_code.co_qualname, site))

        # installed third-party plugins are not steercmp's path (and may not import on an old checkout)
        pluggy.PluginManager.load_setuptools_entrypoints = lambda self, group, name=None: 0  # type: ignore[method-assign]
        sys.setprofile(profile)
        try:
            rc = cli.main(["run", str(exp), "--out", str(root / "out"), "--no-progress"])
        finally:
            sys.setprofile(None)
        if rc != 0:
            raise SystemExit(f"steercmp run exited {rc}")
    return calls


def summarise(calls: list[tuple[str, str, str]]) -> dict[str, Any]:
    """Functions, call sites, modules, entries per module and returns to a module already left."""
    path: list[str] = []
    for module, _, _ in calls:
        if not path or path[-1] != module:
            path.append(module)
    seen: set[str] = set()
    returns = 0
    for module in path:
        returns += module in seen
        seen.add(module)
    return {"functions": len({(m, f) for m, f, _ in calls}),
            "call sites": len({(s, m, f) for m, f, s in calls}),
            "modules": len({m for m, _, _ in calls}),
            "returns": returns,
            "entries": Counter(path).most_common(5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print every receiving function")
    parser.add_argument("--via-self", action="store_true",
                        help="also count methods of objects that hold the experiment (a Runner's)")
    args = parser.parse_args()
    calls = trace_run(args.via_self)
    if args.show:
        for m, f in dict.fromkeys((m, f) for m, f, _ in calls):
            print(f"  {m}:{f}")
    for key, value in summarise(calls).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
