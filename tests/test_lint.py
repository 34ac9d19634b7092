"""The linter and the type checker pass with the settings in pyproject.toml: ruff on the
package, tests, benchmarks and examples; mypy on the public modules (its ``files`` list)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float) -> None:
    res = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                         text=True, timeout=timeout)
    if res.returncode != 0:
        pytest.fail(f"`python -m {' '.join(args)}` failed (exit {res.returncode}):\n"
                    f"{res.stdout}{res.stderr}", pytrace=False)


def test_ruff():
    _run("ruff", "check", "dinofeat", "tests", "benchmarks", "examples", timeout=300)


@pytest.mark.slow
def test_mypy():
    # about a minute on a cold cache (it reads torch's stubs); .mypy_cache keeps reruns quick
    _run("mypy", timeout=900)
