"""The README cannot drift from the code: every client command and every
server setting must be documented there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli.main import main as cli_main
from orchestrator.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("command", sorted(cli_main.commands))
def test_every_client_command_is_in_the_readme(command: str) -> None:
    assert re.search(rf"`backhaul {re.escape(command)}\b", README), \
        f"`backhaul {command}` is missing from README.md"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_in_the_readme_table(setting) -> None:
    row = next((line for line in README.splitlines()
                if line.startswith(f"| `{setting.flag}` ")), None)
    assert row is not None, f"{setting.flag} is missing from the README's settings table"
    assert f"`{setting.env}`" in row
    assert f"`{setting.default or '(empty)'}`" in row


def test_readme_has_exactly_two_setup_commands() -> None:
    block = README.split("## Two commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()
