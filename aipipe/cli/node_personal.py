"""`aipipe node personal`: this site's personal models of a study, and their one way out.

aipipe node personal --home H --study S [--json]
aipipe node personal export --home H --study S --out F --allow-phi-derived
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from aipipe.cli.at_rest import at_rest_key
from aipipe.cli.render import console, emit_json, err_console, kv_table
from aipipe.errors import ConfigError
from aipipe.node.node import Node

app = typer.Typer(
    help="This site's personal models of a study (kept on the node; never sent to the hub).",
    invoke_without_command=True,
)

HOME = typer.Option(None, "--home", help="The node home directory.")
STUDY = typer.Option(None, "--study", help="A study that personalizes.")


@app.callback()
def show(
    ctx: typer.Context,
    home: Path = HOME,
    study: str = STUDY,
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Per global version: global and personal test accuracy and AUC, the personal model's
    validation loss and what it chose, which one is served (the lowest validation loss; test
    numbers are never used to choose), and the ε the study has spent at this site."""
    if ctx.invoked_subcommand is not None:
        return
    from aipipe.node.personal_report import personal_report  # imports torch: only when needed

    if home is None or study is None:
        raise ConfigError("aipipe node personal needs --home and --study")
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        report = personal_report(node.store, study)
    if as_json:
        emit_json(report)
        return
    console.print(kv_table(f"personal models of {study}", {
        "served": report["served"] or "none yet",
        "chosen by": report["selection"],
        "ε spent (study, this site)": report["epsilon_spent"] if report["epsilon_spent"]
        is not None else "no DP",
    }))  # fmt: skip
    console.print(_table(report["models"]))


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title_justify="left")
    columns = ["version", "round", "method", "global acc", "global AUC", "personal acc",
               "personal AUC", "val loss", "chosen", "served"]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["version"][:12], str(row["round"]), row["method"],
            _num(row["global_test_accuracy"]), _num(row["global_test_auc"]),
            _num(row["personal_test_accuracy"]), _num(row["personal_test_auc"]),
            _num(row["validation_loss"]),
            ", ".join(f"{k}={v:g}" for k, v in row["chosen"].items()) or "-",
            "yes" if row["served"] else "",
        )  # fmt: skip
    return table


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@app.command()
def export(
    home: Path = typer.Option(..., "--home", help="The node home directory."),
    study: str = typer.Option(..., "--study", help="A study that personalizes."),
    out: Path = typer.Option(..., "--out", help="Where to write the model (safetensors)."),
    allow_phi_derived: bool = typer.Option(
        False,
        "--allow-phi-derived",
        help="Required: the personal model is derived from this site's patients without DP "
        "noise; say that it may leave the node.",
    ),
) -> None:
    """Write the served personal model as safetensors. Refused without --allow-phi-derived: a
    personal model is derived from patients' data without DP noise and must not leave the
    hospital unless the site decides so. Audited either way."""
    from aipipe.node.personal_report import export_personal  # imports torch

    with Node.open(home, at_rest_key=at_rest_key()) as node:
        digest = export_personal(node.store, node.audit, node.name, study, out,
                                 allow_phi_derived=allow_phi_derived)  # fmt: skip
    err_console.print(f"wrote the personal model of {study} (sha256 {digest[:12]}) to {out}")
