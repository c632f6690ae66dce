"""Developer sessions: ``nox -s tests|tests-fast|tests-all|lint|typecheck|demo|bench``.

torch is pinned to the local CPU wheel (2.13.0) and installed first, so nothing pulls CUDA builds.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"
PYTHON = "3.11"
TORCH = "torch==2.13.0"


def _install(session: nox.Session, extras: str = "") -> None:
    session.install(TORCH)
    session.install("-e", f".{extras}")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the test suite (tiny models plus a few tests on the embedded Gemma 3 270M)."""
    _install(session, "[dev]")
    session.run("pytest", "-q", *session.posargs)


@nox.session(python=PYTHON, name="tests-fast")
def tests_fast(session: nox.Session) -> None:
    """The unit tier only: no whole runs (``integration``) and no embedded 270M (``slow``); minutes."""
    _install(session, "[dev]")
    session.run("pytest", "-q", "-m", "not slow and not integration", *session.posargs)


@nox.session(python=PYTHON, name="tests-all")
def tests_all(session: nox.Session) -> None:
    """Everything: the whole suite (as CI and the README's command run it), then the architecture
    contracts and ruff, so one session says whether a change can land."""
    _install(session, "[dev]")
    session.run("pytest", "-q", *session.posargs)
    session.run("lint-imports")
    session.run("ruff", "check", "steercmp", "plugins", "tests", "scripts")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff over the package, plugins, tests and scripts; import-linter's architecture contracts."""
    _install(session, "[dev]")
    session.run("ruff", "check", "steercmp", "plugins", "tests", "scripts", *session.posargs)
    session.run("lint-imports")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy over the core package."""
    _install(session, "[dev]")
    session.run("mypy", "steercmp", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The embedded run: Gemma 3 270M, mini NLA pair, trained SAE, baselines, report."""
    _install(session)
    session.run("steercmp", "run", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmark steercmp's sweep against a hook loop, nnsight and AxBench-style batching."""
    _install(session, "[dev]")
    session.run("steercmp", "bench", *session.posargs)
