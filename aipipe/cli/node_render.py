"""What `aipipe node` prints: tables for people, JSON with --json; nothing here acts (and the
parsing of an option or two that more than one command reads)."""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from aipipe.cli.render import console, emit_json, err_console, kv_table
from aipipe.errors import ConfigError, SourceError
from aipipe.fhir.smart import DEFAULT_SCOPES
from aipipe.node.ingest import IngestReport
from aipipe.node.node import Scores


def as_of_day_option(text: str | None) -> date | None:
    """`--as-of YYYY-MM-DD` as a day (ConfigError for anything else)."""
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--as-of {text!r} is not a day; give it as YYYY-MM-DD") from None


def print_jwks(client_id: str, jwks: dict[str, object]) -> None:
    err_console.print(
        f"register this JWK Set with the EHR for client_id [bold]{client_id}[/], "
        f"scopes: {DEFAULT_SCOPES}"
    )
    typer.echo(json.dumps(jwks, indent=2))


def check_anything_stored(report: IngestReport) -> None:
    """An ingest that rejected all it read failed: exit non-zero, naming what it read."""
    read, rejected = report.total("read"), report.total("rejected")
    named = report.files_all_rejected
    where = ", ".join(named) if report.source == "files" else report.source
    if read and rejected == read:
        raise SourceError(
            f"node ingest rejected all {read} resources of {where}; the reasons are listed "
            "above: check that these are FHIR R4 NDJSON or Bundle files"
        )
    if named:
        err_console.print(
            f"[yellow]warning:[/] nothing was stored from {escape(', '.join(named))}: "
            "every resource in it was rejected",
            soft_wrap=True,
        )


def render_ingest(report: IngestReport, as_json: bool) -> None:
    data = report.to_dict()
    if as_json:
        emit_json(data)
        return
    table = Table(title=f"ingest from {report.source}", title_justify="left")
    for column in ("type", "read", "stored", "updated", "unchanged", "stale", "rejected"):
        table.add_column(column, justify="left" if column == "type" else "right")
    for rtype, counts in data["types"].items():
        table.add_row(
            rtype,
            *(
                str(counts[c])
                for c in ("read", "stored", "updated", "unchanged", "stale", "rejected")
            ),
        )
    console.print(table)
    for title, reasons in (("rejected", data["rejected_reasons"]), ("warnings", data["warnings"])):
        for reason, count in reasons.items():
            style = "red" if title == "rejected" else "yellow"
            console.print(f"[{style}]{title}[/] {count} × {reason}")


def render_status(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(info)
        return
    console.print(
        kv_table(
            f"node {info['name']}",
            {"patients": info["patients"], "last sync": info["last_sync"] or "never"},
        )
    )
    table = Table(title="resources", title_justify="left")
    table.add_column("type")
    table.add_column("count", justify="right")
    for rtype, count in info["resources"].items():
        table.add_row(rtype, str(count))
    console.print(table)
    if info["cursors"]:
        cursors = Table(title="sync cursors", title_justify="left")
        for column in ("source", "resource_type", "last_updated"):
            cursors.add_column(column)
        for cursor in info["cursors"]:
            cursors.add_row(cursor["source"], cursor["resource_type"], cursor["last_updated"])
        console.print(cursors)


def render_predictions(scores: Scores, as_json: bool) -> None:
    study, version, written = scores.study, scores.version, scores.written
    predictions: list[Any] = scores.predictions
    scored: list[Any] = scores.scored
    if as_json:
        emit_json({
            "study": study, "model_version": version, "scored": len(scored),
            "unscored": len(predictions) - len(scored), "written": written,
            "current_version": scores.current, "older_than_current": scores.older_than_current,
            "passed_over": [t.as_details() for t in scores.passed_over],
            "predictions": [{"patient": p.pseudonym, "probability": p.probability,
                             "level": p.level, "missing": list(p.missing),
                             "not_scored_because": list(p.reasons)} for p in predictions],
        })  # fmt: skip
        return
    levels: dict[str, int] = {}
    for p in scored:
        levels[p.level] = levels.get(p.level, 0) + 1
    mean = sum(p.probability for p in scored) / len(scored) if scored else 0.0
    console.print(kv_table(f"{study} with model {version[:12]}", {
        "scored": len(scored), "not scored": len(predictions) - len(scored),
        "mean risk": f"{mean:.3f}", **{f"risk {k}": v for k, v in sorted(levels.items())},
        "RiskAssessments written": written,
    }))  # fmt: skip
    if scores.older_than_current:
        console.print(f"model {version[:12]} is older than the current version "
                      f"{str(scores.current)[:12]}: on this site's held-out patients the newer "
                      "versions miss the study's validation minimum ("
                      + "; ".join(t.describe() for t in scores.passed_over) + ")",
                      markup=False, soft_wrap=True)  # fmt: skip
    for p in predictions:
        if p.probability is None:
            why = "; ".join(p.reasons) or "missing " + ", ".join(p.missing)
            console.print(f"not scored {p.pseudonym}: {why}", markup=False)
