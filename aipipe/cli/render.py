"""Rendering shared by every command: consoles, JSON output, and the one place that maps
`AipipeError` to a red line and an exit code."""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from aipipe.errors import AipipeError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(exc: AipipeError) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(exc.exit_code)


class AipipeGroup(TyperGroup):
    """Turns any `AipipeError` raised below it into `fail(...)`: no traceback for user errors."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click.Context
        try:
            return super().invoke(ctx)
        except AipipeError as exc:
            fail(exc)


def emit_json(payload: Any) -> None:
    typer.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))


def kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows.items():
        table.add_row(key, escape(str(value)))
    return table
