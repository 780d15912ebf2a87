"""The tree passes the lint rules selected in pyproject.toml ([tool.ruff.lint])."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_ruff_passes_on_the_package_tests_and_scripts():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "arsq_lightning", "tests", "scripts"],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
