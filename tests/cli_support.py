"""Running the `aipipe` command line in-process through Typer's CliRunner, and what a user error
looks like there."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner, Result

from aipipe.cli.app import app

runner = CliRunner()


def invoke(*args: str | Path) -> Result:
    return runner.invoke(app, [str(arg) for arg in args])


def assert_user_error(result: Result, exit_code: int) -> str:
    """A user error: the given exit code, one `error:` line on stderr, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]
