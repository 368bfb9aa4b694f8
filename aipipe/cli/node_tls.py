"""`aipipe node tls`: the node's TLS client certificate (mutual TLS), and `aipipe node enrol`.

aipipe node tls show  --home H [--json]   its name, expiry, and whether renewal is due
aipipe node tls renew --home H [--json]   a new key and certificate from the hub (one command)
aipipe node enrol     --home H --token T  (re-)enrol an existing node home, keeping its data
"""

from __future__ import annotations

from pathlib import Path

import typer
from cryptography import x509

from aipipe.cli.at_rest import at_rest_key
from aipipe.cli.render import console, emit_json, kv_table
from aipipe.node import client_cert
from aipipe.node.home import enrol as enrol_home
from aipipe.node.home import open_audit, open_node, renew_client_cert
from aipipe.pki import common_name, fingerprint

app = typer.Typer(help="The node's TLS client certificate (mutual TLS).", no_args_is_help=True)
HOME = typer.Option(..., "--home", help="The node home directory.")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def _info(home: Path, cert: x509.Certificate) -> dict[str, str | bool | None]:
    return {
        "node": common_name(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "renewal_due": client_cert.due(cert),
        "sha256": fingerprint(cert),
        "file": str(home / client_cert.CLIENT_CERT),
    }


def _current(home: Path) -> x509.Certificate:
    paths = open_node(home, at_rest_key())
    return client_cert.current(paths.home, paths.at_rest)


@app.command("show")
def show(home: Path = HOME, as_json: bool = JSON) -> None:
    """The node's client certificate: its name, expiry and whether renewal is due (under a
    third of its lifetime left)."""
    info = _info(home, _current(home))
    if as_json:
        emit_json(info)
        return
    console.print(kv_table("TLS client certificate", {k: str(v) for k, v in info.items()}))


@app.command("renew")
def renew(home: Path = HOME, as_json: bool = JSON) -> None:
    """Renew the node's TLS client certificate: a new key (kept in the home, 0600) and a new
    certificate signed by the consortium CA. Run it any time before the current one expires
    (the daemon need not stop: it picks the new pair up at its next start)."""
    paths = open_node(home, at_rest_key())
    cert = renew_client_cert(paths)
    info = _info(home, cert)
    with open_audit(paths) as audit:
        audit.append(
            "node.cert_renewed",
            actor=paths.config.name,
            resource=f"node/{paths.config.name}",
            details={"not_after": info["not_after"], "sha256": info["sha256"]},
        )
    if as_json:
        emit_json(info)
        return
    console.print(f"[green]✓[/] new TLS client certificate, valid until {info['not_after']}")


def enrol(
    home: Path = HOME,
    token: str = typer.Option(
        ...,
        "--token",
        envvar="AIPIPE_ENROL_TOKEN",
        help="Enrolment token from `aipipe hub enrol-token` (with --replace for an enrolled node).",
    ),
) -> None:
    """Enrol an existing node home with the hub (again), keeping its data, keys and ledger:
    a new credential and, from a hub with a consortium CA, a new TLS client certificate."""
    url = enrol_home(open_node(home, at_rest_key()), token)
    console.print(f"[green]✓[/] enrolled with the hub at {url}")
