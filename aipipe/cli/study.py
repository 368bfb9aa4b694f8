"""`aipipe study`: validate a study definition and extract its features on a node."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from aipipe.cli.at_rest import at_rest_key
from aipipe.cli.options import HUB, TOKEN, client
from aipipe.cli.render import console, emit_json, kv_table
from aipipe.node.node import Node
from aipipe.study.spec import load_study

app = typer.Typer(help="Define studies and extract their features.", no_args_is_help=True)

HOME = typer.Option(..., "--home", help="The node home (created by `aipipe node init`).")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


@app.command()
def validate(
    study_file: Path = typer.Argument(..., help="The study YAML file."), as_json: bool = JSON
) -> None:
    """Check a study YAML file and show what it asks for."""
    spec = load_study(study_file)
    summary = {
        "name": spec.name,
        "digest": spec.digest(),
        "columns": spec.columns(),
        "label": list(spec.cohort.label.conditions),
        "model": spec.model.kind,
        "privacy": spec.privacy.mode,
        "secure": spec.secure,
        "aggregation": spec.aggregation.name,
    }
    if as_json:
        emit_json({"valid": True, **summary})
        return
    console.print(f"[green]✓[/] {study_file} is a valid study")
    console.print(kv_table(f"study {spec.name}", {k: v for k, v in summary.items() if k != "name"}))


@app.command()
def features(
    study_file: Path = typer.Argument(..., help="The study YAML file."),
    home: Path = HOME,
    as_json: bool = JSON,
) -> None:
    """Extract the study's feature matrix on this node and summarise it.

    Shows cohort size, train/test sizes, label prevalence and missingness per feature.
    No patient-level data is printed.
    """
    spec = load_study(study_file)
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        matrix = node.extract(spec)
    summary = matrix.summary()
    if as_json:
        emit_json(summary)
        return
    console.print(
        kv_table(
            f"study {spec.name} on {home}",
            {
                "patients": summary["patients"],
                "cohort": summary["cohort"],
                "train": summary["train"],
                "test": summary["test"],
                "prevalence": summary["prevalence"],
            },
        )
    )
    table = Table(
        title="missing per feature (before the study's missing policy)", title_justify="left"
    )
    table.add_column("feature")
    table.add_column("missing", justify="right")
    for name, fraction in matrix.missing.items():
        table.add_row(name, f"{fraction:.1%}")
    console.print(table)


@app.command()
def publish(
    study_file: Path = typer.Argument(..., help="The study YAML file."),
    hub: str = HUB,
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """Publish a study to the hub; nodes then review and approve it (`aipipe node approve`)."""
    spec = load_study(study_file)
    with client(hub, token) as hub_client:
        info = hub_client.publish(spec.model_dump(mode="json"))
    if as_json:
        emit_json(info.model_dump(mode="json"))
        return
    console.print(f"[green]✓[/] published study [bold]{info.name}[/] (digest {info.digest[:12]})")
