"""README.md stays true: its model table is the zoo's, its command lines parse with the
real parser, its relative links point at files of the repository, and its set-up commands
(which CI runs) are unchanged.

After a zoo change, regenerate the table: replace the lines between the ``zoo-table``
markers in README.md with the output of ``dinofeat models --markdown``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dinofeat import cli, zoo

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the ``## title`` section of the README."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def test_model_table_is_the_zoo():
    m = re.search(r"<!-- zoo-table:begin[^>]*-->\n(.*?)\n<!-- zoo-table:end -->", README,
                  flags=re.S)
    assert m, "README.md lost its zoo-table markers"
    assert m.group(1) == zoo.format_markdown_table(), (
        "README.md's model table differs from the zoo: replace it with the output of "
        "`dinofeat models --markdown`")


def test_set_up_commands_are_the_ci_ones():
    block = re.search(r"```bash\n(.*?)```", section("Set up"), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]


def glance_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", section("The command line at a glance"),
                      flags=re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines()
            if line.startswith("dinofeat ")]


@pytest.mark.parametrize("command", glance_commands())
def test_command_line_at_a_glance_parses(command):
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    assert callable(args.func)


def test_relative_links_exist():
    targets = re.findall(r"\]\((?!https?://|#)([^)#\s]+)", README)
    assert targets
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
