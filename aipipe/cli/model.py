"""`aipipe model`: the hub's model registry — versions, lineage, export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from aipipe.cli.options import HUB, JSON, TOKEN, client
from aipipe.cli.render import console, emit_json, kv_table
from aipipe.errors import ConfigError, NotFoundError
from aipipe.node.client import HubClient

app = typer.Typer(help="List, inspect and export model versions.", no_args_is_help=True)

VERSION_LENGTH = 64  # a version id is a sha256 in hex; tables print its first 12 characters


def resolve_version(hub_client: HubClient, version: str) -> str:
    """The full version id that `version` abbreviates (as the tables print it), if exactly one."""
    if len(version) == VERSION_LENGTH:
        return version
    matches = [m["version"] for m in hub_client.models() if m["version"].startswith(version)]
    if not matches or not version:
        raise NotFoundError(
            f"no model version starts with {version!r}; `aipipe model list` shows them"
        )
    if len(matches) > 1:
        raise ConfigError(
            f"model version {version!r} is ambiguous: {len(matches)} versions start with it; "
            "give more characters"
        )
    return str(matches[0])


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
    version: str = typer.Argument(..., help="The model version id, or an unambiguous prefix."),
    hub: str = HUB,
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """Show one version's lineage: parent, contributors (n, ε; with `detection`, each update's
    scores, flag and the node's reputation), updates left out, aggregator, metrics."""
    with client(hub, token) as hub_client:
        version = resolve_version(hub_client, version)
        info = hub_client.model(version)
    if as_json:
        emit_json(info)
        return
    console.print(
        kv_table(
            f"model {version[:12]}",
            {k: v for k, v in info.items() if k not in _TABLES},
        )
    )
    _show_personalization(info.get("personalization"))
    _show_validation(info.get("validation"))
    contributors, excluded = info["contributors"], info.get("excluded", [])
    for title, rows in (
        ("contributors", [_without(c, _SCORES) for c in contributors]),
        (
            "screening (detection)",
            [_screening(c) for c in contributors + excluded if _SCORES & set(c)],
        ),
        ("metrics", [{"node": k, **_flat(v)} for k, v in info["metrics"].items()]),
    ):
        if rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            table = Table(title=title, title_justify="left")
            for column in columns:
                table.add_column(column, no_wrap=column == "node")
            for row in rows:
                table.add_row(*(str(row.get(c, "")) for c in columns))
            console.print(table)


_TABLES = ("contributors", "excluded", "metrics", "validation", "personalization")
_SCORES = {
    "distance",
    "norm",
    "cosine",
    "z_distance",
    "z_norm",
    "z_direction",
    "flagged",
    "excluded",
    "reputation",
}


def _without(row: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in keys}


def _screening(row: dict[str, Any]) -> dict[str, Any]:
    """One update's scores in its round (`detection`), and its node's reputation after it."""
    names = {
        "distance": "dist",
        "z_distance": "z dist",
        "z_norm": "z norm",
        "z_direction": "z dir",
        "flagged": "flag",
        "excluded": "out",
        "reputation": "rep",
    }
    scores = {names.get(k, k): _cell(v) for k, v in row.items() if k in _SCORES}
    return {"node": row["node"], **scores}


def _cell(value: object) -> str:
    """A table cell: floats to 3 significant digits (scores, norms), flags as yes / no."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _flat(report: dict[str, object]) -> dict[str, object]:
    """A node's report without its histogram (the validation table shows the pooled one)."""
    return {k: ("DP histogram" if k == "calibration" and v else v) for k, v in report.items()}


def _show_personalization(card: dict[str, Any] | None) -> None:
    """The study's personalization method, what the hub federates and what stays at nodes."""
    if card is None:
        return
    console.print(
        f"personalization: {card['method']}; the hub federates "
        f"{', '.join(card['shared']) or 'nothing'}; each node keeps "
        f"{', '.join(card['local']) or 'nothing'} (never sent); hub CDS: {card['hub_cds']}"
    )


def _show_validation(card: dict[str, Any] | None) -> None:
    """The pooled validation against the study's minimum, and its calibration table."""
    if card is None:
        return
    verdict = "[green]meets the study's minimum" if card["passed"] else "[red]not served"
    console.print(f"validation ({card.get('source')}, {card.get('sites', 0)} sites): {verdict}")
    for failure in card.get("failures", []):
        console.print(f"  [red]✗[/] {failure}")
    if "auc" not in card:
        return
    console.print(
        f"  n ≈ {card['n']}, AUC {card['auc']}, calibration error (ECE) "
        f"{card['calibration_error']}, observed/expected {card['observed_expected']}"
        + (f", ε {card['epsilon']} per site" if card.get("epsilon") else "")
    )
    table = Table(title="calibration", title_justify="left")
    for column in ("predicted", "n", "observed rate"):
        table.add_column(column)
    for b in card["bins"]:
        lo, hi = b["range"]
        observed = "—" if b["observed"] is None else f"{b['observed']:.2f}"
        table.add_row(f"{lo:.1f}–{hi:.1f}", f"{b['n']:.0f}", observed)
    console.print(table)


@app.command()
def export(
    version: str = typer.Argument(..., help="The model version id, or an unambiguous prefix."),
    out: Path = typer.Option(..., "--out", help="Write <out>.safetensors and <out>.json here."),
    hub: str = HUB,
    token: str = TOKEN,
) -> None:
    """Export a version's weights (safetensors) and lineage (JSON); creates missing folders."""
    with client(hub, token) as hub_client:
        version = resolve_version(hub_client, version)
        weights = hub_client.model_weights(version)
        info = hub_client.model(version)
    weights_path = out.with_suffix(".safetensors")
    lineage_path = out.with_suffix(".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        weights_path.write_bytes(weights)
        lineage_path.write_text(json.dumps(info, indent=2))
    except OSError as exc:
        raise ConfigError(
            f"cannot write the export to {out.parent}: {exc.strerror}; choose another --out"
        ) from exc
    console.print(f"[green]✓[/] wrote {weights_path} and {lineage_path}")
