"""`aipipe hub`: set up and run a consortium's hub, issue enrolment tokens, list and readmit
nodes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from aipipe.cli.at_rest import KEY_FILE, at_rest_key
from aipipe.cli.options import JSON
from aipipe.cli.render import console, emit_json, err_console, kv_table
from aipipe.hub.enrolment import parse_ttl
from aipipe.hub.hub import Hub
from aipipe.pki import DEFAULT_NAMES, server_names

app = typer.Typer(help="Run a consortium's hub: init, serve, enrol nodes.", no_args_is_help=True)
tls_app = typer.Typer(help="The hub's TLS certificate (consortium CA).", no_args_is_help=True)
app.add_typer(tls_app, name="tls")
HOME = typer.Option(..., "--home", help="The hub home directory.")
TLS_NAMES_HELP = (
    "A DNS name or IP address nodes use to reach the hub (repeatable), put in the hub "
    "certificate's subjectAltName"
)


@app.command()
def init(
    home: Path = HOME,
    name: str = typer.Option("hub", "--name", help="The consortium hub's name."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing hub home."),
    tls_names: list[str] = typer.Option(
        list(DEFAULT_NAMES), "--tls-name", help=TLS_NAMES_HELP + "; default localhost, 127.0.0.1."
    ),
    mtls: bool = typer.Option(
        False,
        "--mtls",
        help="Require mutual TLS: a node's calls must present its client certificate "
        "(issued at enrolment). Change later with `aipipe hub tls mtls on|off`.",
    ),
    at_rest_key_file: Path = KEY_FILE,
    as_json: bool = JSON,
) -> None:
    """Create a hub home, its consortium CA and TLS certificate, and print the admin token
    (shown once; keep it secret). Enrolment tokens pin the CA's SHA-256 fingerprint. With an
    at-rest key the model blobs and the home's private keys are sealed with it (AES-256-GCM)."""
    key = at_rest_key(at_rest_key_file)
    hub, token = Hub.init(home, name, force=force, tls_names=tls_names, mtls=mtls, at_rest_key=key)
    ca_sha256 = hub.ca_fingerprint()
    if as_json:
        emit_json({"home": str(home), "admin_token": token, "ca_sha256": ca_sha256})
        return
    console.print(f"[green]✓[/] hub [bold]{name}[/] created at {home}")
    console.print(f"consortium CA SHA-256 (enrolment tokens pin it): {ca_sha256}")
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
        help="Serve plain HTTP instead of HTTPS: development on a loopback --host only.",
    ),
) -> None:
    """Serve the hub's HTTP API until interrupted. Writes <home>/serve.json with its URL.

    HTTPS (TLS 1.3) with hub.yaml's tls_cert and tls_key (made by `hub init`, renewed by
    `hub tls rotate`); plain HTTP only with --insecure-http on a loopback --host."""
    hub = Hub.open(home, at_rest_key=at_rest_key())
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
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        issued = hub.enrol_token(node, url=url, ttl_s=ttl_s, replace=replace)
        ca_sha256 = hub.ca_fingerprint()
    token, expires_at = issued.token, issued.expires_at
    if as_json:
        emit_json({"node": node, "token": token, "expires_at": expires_at, "replace": replace,
                   "ca_sha256": ca_sha256})  # fmt: skip
    else:
        err_console.print(f"token for {node} expires at {expires_at}")
        typer.echo(token)


@tls_app.command("rotate")
def tls_rotate(
    home: Path = HOME,
    tls_names: list[str] = typer.Option(
        None, "--tls-name", help=TLS_NAMES_HELP + "; default: the current certificate's names."
    ),
    as_json: bool = JSON,
) -> None:
    """Issue a new hub certificate from the consortium CA (nodes pin the CA, so they keep
    working); restart `hub serve` to use it. A home without a CA gets one."""
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        cert = hub.rotate_tls(tls_names or None)
        info = {
            "tls_cert": str(home / (hub.paths.config.tls_cert or "")),
            "names": server_names(cert),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "ca_sha256": hub.ca_fingerprint(),
        }
    if as_json:
        emit_json(info)
        return
    console.print("[green]✓[/] new hub certificate; restart `aipipe hub serve` to use it")
    console.print(kv_table("hub TLS", {k: str(v) for k, v in info.items()}))


@tls_app.command("mtls")
def tls_mtls(
    state: str = typer.Argument(..., help="on: require node client certificates; off: not."),
    home: Path = HOME,
) -> None:
    """Turn mutual TLS on or off (hub.yaml mtls); restart `hub serve` to apply it. Nodes
    enrolled before this version have no client certificate: re-enrol them first."""
    if state not in ("on", "off"):
        raise typer.BadParameter(f"say on or off, not {state!r}", param_hint="STATE")
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        hub.set_mtls(state == "on")
    console.print(f"[green]✓[/] mutual TLS {state}; restart `aipipe hub serve` to apply it")


@app.command()
def nodes(home: Path = HOME, as_json: bool = JSON) -> None:
    """List enrolled nodes with their state and when they were last seen."""
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
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
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        previous = hub.readmit(node)
    if as_json:
        emit_json({"node": node, "previous": previous, "reputation": 1.0})
        return
    console.print(f"[green]✓[/] {node} readmitted: reputation {previous:.3g} → 1")
