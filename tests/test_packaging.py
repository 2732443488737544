"""What installing the package asks of the user's environment."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())


def test_torch_requirement_takes_the_users_torch():
    # an upper bound makes pip replace the user's torch (a CUDA build by a CPU one, or download)
    (torch,) = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert "<" not in torch and "==" not in torch and ">=" in torch, torch


def test_license_is_an_spdx_string():
    # a table is deprecated by setuptools (it warns on every build)
    assert PYPROJECT["project"]["license"] == "MIT"
