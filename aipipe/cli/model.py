"""`aipipe model`: the hub's model registry — versions, lineage, export."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from aipipe.cli.options import HUB, JSON, TOKEN, client
from aipipe.cli.render import console, emit_json, kv_table

app = typer.Typer(help="List, inspect and export model versions.", no_args_is_help=True)


@app.command("list")
def list_models(
    study: str = typer.Option(None, "--study", help="Only this study's versions."),
    hub: str = HUB,
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """List model versions with their round, parent and contributing nodes."""
    with client(hub, token) as hub_client:
        models = hub_client.models(study)
    if as_json:
        emit_json(models)
        return
    table = Table(title="model versions", title_justify="left")
    for column in ("version", "study", "round", "parent", "nodes", "aggregator", "created"):
        table.add_column(column)
    for m in models:
        table.add_row(
            m["version"][:12],
            m["study"],
            str(m["round"]),
            (m["parent"] or "")[:12],
            str(len(m["contributors"])),
            m["aggregator"],
            m["created_at"],
        )
    console.print(table)


@app.command()
def show(
    version: str = typer.Argument(..., help="The full model version id."),
    hub: str = HUB,
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """Show one version's lineage: parent, contributors (n, ε), aggregator, metrics."""
    with client(hub, token) as hub_client:
        info = hub_client.model(version)
    if as_json:
        emit_json(info)
        return
    console.print(
        kv_table(
            f"model {version[:12]}",
            {k: v for k, v in info.items() if k not in ("contributors", "metrics")},
        )
    )
    for title, rows in (
        ("contributors", info["contributors"]),
        ("metrics", [{"node": k, **v} for k, v in info["metrics"].items()]),
    ):
        if rows:
            table = Table(title=title, title_justify="left")
            for column in rows[0]:
                table.add_column(column)
            for row in rows:
                table.add_row(*(str(v) for v in row.values()))
            console.print(table)


@app.command()
def export(
    version: str = typer.Argument(..., help="The full model version id."),
    out: Path = typer.Option(..., "--out", help="Write <out>.safetensors and <out>.json here."),
    hub: str = HUB,
    token: str = TOKEN,
) -> None:
    """Export a version's weights (safetensors) and lineage (JSON)."""
    with client(hub, token) as hub_client:
        weights = hub_client.model_weights(version)
        info = hub_client.model(version)
    weights_path = out.with_suffix(".safetensors")
    lineage_path = out.with_suffix(".json")
    weights_path.write_bytes(weights)
    lineage_path.write_text(json.dumps(info, indent=2))
    console.print(f"[green]✓[/] wrote {weights_path} and {lineage_path}")
