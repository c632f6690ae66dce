"""The worked control of docs/plugins.md, taken from the page as printed, passes the kit, and
its bad options are refused in one line."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from steercmp.errors import ConfigError
from steercmp.testing import check_control

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def signflip(tmp_path_factory):
    text = DOC.read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "class SignFlip(Control)" in b)
    folder = tmp_path_factory.mktemp("doc") / "steercmp_signflip"
    folder.mkdir()
    (folder / "__init__.py").write_text(block)
    spec = importlib.util.spec_from_file_location("steercmp_signflip", folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["steercmp_signflip"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("steercmp_signflip", None)


def test_the_documented_control_passes_the_kit(signflip):
    proposals = check_control(signflip.SignFlip, options={"scale": 2.0}, plugin=signflip)
    assert proposals and all(p.delta is not None for p in proposals)


@pytest.mark.parametrize("options,words", [({"scale": -1}, "scale must be a positive number"),
                                           ({"scale": 1, "bogus": 2}, "unknown option(s) ['bogus']")])
def test_the_documented_control_refuses_bad_options(signflip, options, words):
    with pytest.raises(ConfigError) as info:
        signflip.SignFlip(options)
    assert words in info.value.one_line() and "fix:" in info.value.one_line()
