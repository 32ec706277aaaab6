"""docs/cli.md is what the command's own help says now, for every command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfn_checkpoint._cli_docs import WIDTH, documented_commands, render_docs
from cfn_checkpoint.cli import EXIT_CODE_MEANINGS, EXIT_STDOUT_CLOSED, cli, exit_code_for
from cfn_checkpoint.errors import CheckpointError, ErrorCode

from cli_support import CLEAN_ENV, clean_environ

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
COMMANDS = documented_commands(cli)
REGENERATE = "python -m cfn_checkpoint.cli docs -o docs/cli.md"


def section(name: str) -> str:
    title = "cfn-checkpoint" + (f" {name}" if name else "")
    match = re.search(rf"^## `{title}`\n\n```text\n(.*?)\n```$", DOCS.read_text(), re.M | re.S)
    assert match, f"docs/cli.md has no section for {title!r}"
    return match.group(1)


def test_docs_are_up_to_date() -> None:
    assert DOCS.read_text(encoding="utf-8") == render_docs(cli, EXIT_CODE_MEANINGS), (
        f"docs/cli.md is out of date: run `{REGENERATE}`"
    )


def test_the_docs_command_through_the_entry_point() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cfn_checkpoint.cli", "docs"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_environ(), "COLUMNS": "40"},  # the terminal does not matter
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == DOCS.read_text(encoding="utf-8")


def test_every_command_is_documented() -> None:
    assert set(COMMANDS) == {
        "cleanup", "create", "demo", "diff", "export", "import", "list", "recover", "show",
        "tasks", "verify", "watch",
    }  # fmt: skip
    for name in COMMANDS:
        assert section(name)


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_each_section_is_the_command_help(name: str) -> None:
    args = [name, "--help"] if name else ["--help"]
    result = CliRunner().invoke(
        cli, args, env=CLEAN_ENV, prog_name="cfn-checkpoint", terminal_width=WIDTH
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip() == section(name)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_documents_its_json(name: str) -> None:
    assert "--json: " in section(name)


def test_exit_codes_are_documented() -> None:
    text = DOCS.read_text()
    documented = {code for code, _ in EXIT_CODE_MEANINGS}
    assert documented == {0, 1, 2, 3, 4, EXIT_STDOUT_CLOSED}
    for error_code in ErrorCode:
        assert exit_code_for(CheckpointError("x", code=error_code)) in documented
    for code, meaning in EXIT_CODE_MEANINGS:
        assert f"| {code} | {meaning} |" in text
    assert "Exit codes: 0 success" in section("")
    assert f"{EXIT_STDOUT_CLOSED} stdout closed early" in " ".join(section("").split())


def test_the_docs_explain_scores_pipes_and_options_after_the_command() -> None:
    text = " ".join(DOCS.read_text().split())
    scores = 'A sorted-set score is a string, exactly as Redis gives it (`"1.5"`, `"inf"`'
    assert scores in text
    assert "`--json` and `-v` may also follow it" in text
    assert "exit code 141" in text and "`import -` reads one from stdin" in text
    for name in COMMANDS:
        assert re.search(r"^  --json\s+Print JSON", section(name), re.M), name
        assert re.search(r"^  -v, --verbose\s+", section(name), re.M), name
