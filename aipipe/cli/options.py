"""Options shared by the commands that talk to a hub as a person (admin, scientist)."""

from __future__ import annotations

import typer

from aipipe.node.client import HubClient

HUB = typer.Option(..., "--hub", envvar="AIPIPE_HUB_URL", help="The hub's URL.")
TOKEN = typer.Option(
    ..., "--token", envvar="AIPIPE_TOKEN", help="Your API token (the admin token from `hub init`)."
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def client(hub: str, token: str) -> HubClient:
    return HubClient(hub, token=token)
