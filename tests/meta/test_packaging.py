"""Packaging: a wheel installs steercmp, steercmp_plugins and steercmp_experiments, never `plugins`."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    found = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join((pkg, *rel.parts)) if rel.parts else pkg)
    assert found == listed


def test_torch_is_a_range_and_the_cpu_pin_lives_in_the_install_commands():
    """The library takes a torch range (a CUDA or newer torch stays); the README and CI install
    the local CPU wheel first, so an unpinned resolve never pulls CUDA builds here."""
    from packaging.requirements import Requirement

    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    torch_req = next(r for r in deps if r.name == "torch")
    assert "2.13.0" in torch_req.specifier and "2.14.1" in torch_req.specifier and "2.4.0" in torch_req.specifier
    assert not any(spec.operator == "==" for spec in torch_req.specifier)
    for doc in (ROOT / "README.md", ROOT / ".ci" / "run"):
        assert "pip install -q torch==2.13.0 &&" in doc.read_text()


@pytest.mark.slow
def test_wheel_does_not_claim_generic_names(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("steercmp-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "plugins" not in tops and "experiments" not in tops and "tests" not in tops
    assert {"steercmp", "steercmp_plugins", "steercmp_experiments"} <= tops
    assert "steercmp_experiments/embedded.yaml" in names
    assert "steercmp_experiments/batteries/note8.yaml" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "steercmp = steercmp.cli:main" in text
