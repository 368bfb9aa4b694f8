"""`aipipe hub`: set up and run a consortium's hub, issue enrolment tokens, list and readmit
nodes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from aipipe.cli.options import JSON
from aipipe.cli.render import console, emit_json, err_console, kv_table
from aipipe.hub.enrolment import parse_ttl
from aipipe.hub.hub import Hub

app = typer.Typer(help="Run a consortium's hub: init, serve, enrol nodes.", no_args_is_help=True)
HOME = typer.Option(..., "--home", help="The hub home directory.")


@app.command()
def init(
    home: Path = HOME,
    name: str = typer.Option("hub", "--name", help="The consortium hub's name."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing hub home."),
    as_json: bool = JSON,
) -> None:
    """Create a hub home and print the admin token (shown once; keep it secret)."""
    _, token = Hub.init(home, name, force=force)
    if as_json:
        emit_json({"home": str(home), "admin_token": token})
        return
    console.print(f"[green]✓[/] hub [bold]{name}[/] created at {home}")
    console.print("admin token (shown once, store it in a secret manager):")
    typer.echo(token)


@app.command()
def serve(
    home: Path = HOME,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8700, "--port", min=0, max=65535, help="Port; 0 picks a free one."),
    insecure_http: bool = typer.Option(
        False,
        "--insecure-http",
        help="Serve plain HTTP on a non-loopback --host (only behind a TLS-terminating proxy).",
    ),
) -> None:
    """Serve the hub's HTTP API until interrupted. Writes <home>/serve.json with its URL.

    HTTPS with hub.yaml's tls_cert and tls_key (PEM files, relative to the home); without them
    only on a loopback --host, unless --insecure-http."""
    hub = Hub.open(home)
    err_console.log(f"hub {hub.name} serving from {home}")
    hub.serve(host, port, insecure_http=insecure_http)


@app.command("enrol-token")
def enrol_token(
    home: Path = HOME,
    node: str = typer.Option(..., "--node", help="The node's name, e.g. 'cleveland'."),
    url: str = typer.Option(
        None, "--url", help="The hub URL nodes use (default: where it serves)."
    ),
    ttl: str = typer.Option(
        "24h", "--ttl", help="How long the token stays valid: e.g. 3600, 30m, 24h, 7d (max 30d)."
    ),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="Re-enrol a node that is already enrolled: the token moves the name to a new key "
        "and revokes the old credential (audited as node.re_enrolled).",
    ),
    as_json: bool = JSON,
) -> None:
    """Print a one-time enrolment token for a node (hub URL + secret)."""
    ttl_s = parse_ttl(ttl)
    with Hub.open(home) as hub:
        issued = hub.enrol_token(node, url=url, ttl_s=ttl_s, replace=replace)
    token, expires_at = issued.token, issued.expires_at
    if as_json:
        emit_json({"node": node, "token": token, "expires_at": expires_at, "replace": replace})
    else:
        err_console.print(f"token for {node} expires at {expires_at}")
        typer.echo(token)


@app.command()
def nodes(home: Path = HOME, as_json: bool = JSON) -> None:
    """List enrolled nodes with their state and when they were last seen."""
    with Hub.open(home) as hub:
        rows = hub.nodes()
    if as_json:
        emit_json(rows)
        return
    if not rows:
        console.print(kv_table("nodes", {"enrolled": 0}))
        return
    table = Table(title="nodes", title_justify="left")
    for column in ("name", "state", "enrolled_at", "last_seen", "reputation", "flags"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(str(row[c] or "never") for c in ("name", "state", "enrolled_at", "last_seen")),
            f"{row['reputation']:.3g}",
            str(row["flags"]),
        )
    console.print(table)


@app.command()
def readmit(
    home: Path = HOME,
    node: str = typer.Option(..., "--node", help="The node to readmit, e.g. 'cleveland'."),
    as_json: bool = JSON,
) -> None:
    """Readmit a node that studies with `detection` left out for its low reputation: its
    reputation goes back to 1 (audited as node.readmitted)."""
    with Hub.open(home) as hub:
        previous = hub.readmit(node)
    if as_json:
        emit_json({"node": node, "previous": previous, "reputation": 1.0})
        return
    console.print(f"[green]✓[/] {node} readmitted: reputation {previous:.3g} → 1")
