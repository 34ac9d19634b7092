"""The documentation site builds with ``mkdocs build --strict`` (no broken link, no missing
page, no docstring the API reference cannot parse) and has its main pages.

Needs the ``docs`` extra (``scripts/test.sh`` installs it); skipped without it. The build
runs docs/hooks.py, which refreshes docs/cli.md (committed) from ``dinofeat --help``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

for _module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    pytest.importorskip(_module, reason=f"{_module} is not installed: pip install -e '.[docs]'")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def page(site: Path, name: str) -> str:
    """The HTML of page ``name`` (``""`` for the home page), as mkdocs lays it out."""
    path = site / name / "index.html" if name else site / "index.html"
    assert path.is_file(), f"the site has no {name or 'home'} page"
    return path.read_text(encoding="utf-8")


def test_home_and_guides_exist(site):
    assert "dinofeat" in page(site, "")
    for name in ("concepts", "architecture", "examples", "weights", "search", "training",
                 "evaluation", "performance", "benchmarks", "reliability", "comparison"):
        page(site, name)


def test_api_reference_is_generated_from_docstrings(site):
    html = page(site, "api")
    for name in ("dinofeat.load", "KNNIndex", "attention_maps", "knn_classify", "FeatureSpec",
                 "FeatureModel"):
        assert name in html, f"the API page does not document {name}"


def test_cli_reference_is_generated_from_help(site):
    html = page(site, "cli")
    for verb in ("models", "embed", "attn", "index build", "search", "dedup", "train",
                 "eval knn", "export"):
        assert f"dinofeat {verb}" in html, f"the CLI page lacks `dinofeat {verb}`"
    assert "--help" in html


def test_examples_page_lists_every_example(site):
    html = page(site, "examples")
    for script in sorted((REPO / "examples").iterdir()):
        if script.suffix in (".py", ".ipynb"):
            assert f"examples/{script.name}" in html, f"{script.name} is not on the page"
