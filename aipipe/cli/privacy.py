"""`aipipe privacy`: the node's privacy budget per study."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import typer
from rich.table import Table

from aipipe.cli.options import JSON
from aipipe.cli.render import console, emit_json
from aipipe.node.home import open_node, open_store

app = typer.Typer(help="Watch the node's privacy budget.", no_args_is_help=True)


@app.command()
def status(
    home: Path = typer.Option(..., "--home", help="The node home."), as_json: bool = JSON
) -> None:
    """ε spent and left per study (composed over all rounds with the study's accountant)."""
    from aipipe.privacy.ledger import BudgetLedger  # imports torch: only when needed

    store = open_store(open_node(home))
    try:
        rows = [dataclasses.asdict(entry) for entry in BudgetLedger(store.db).status()]
    finally:
        store.close()
    if as_json:
        emit_json(rows)
        return
    table = Table(title="privacy budget", title_justify="left")
    if rows:
        for column in rows[0]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
