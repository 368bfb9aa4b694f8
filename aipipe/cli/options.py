"""Options shared by the commands that talk to a hub as a person (admin, scientist)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from aipipe.node.client import HubClient

HUB = typer.Option(..., "--hub", envvar="AIPIPE_HUB_URL", help="The hub's URL.")
TOKEN = typer.Option(
    ..., "--token", envvar="AIPIPE_TOKEN", help="Your API token (the admin token from `hub init`)."
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def client(hub: str, token: str) -> HubClient:
    """A client for `hub`; AIPIPE_HUB_CA names a PEM file of the CA that signs its certificate
    when that is the consortium's own (trusted on top of the public CAs)."""
    ca_bundle = os.environ.get("AIPIPE_HUB_CA")
    return HubClient(hub, token=token, ca_bundle=Path(ca_bundle) if ca_bundle else None)
