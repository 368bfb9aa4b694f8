"""`aipipe hub user ...`, `aipipe hub token ...` and `aipipe login`: people, API tokens, logins.

`hub user` and `hub token` work on the hub home (the operator on the hub machine is admin by
filesystem access; audited as ``admin/operator``); remote admins use the same operations over
HTTP (`/v1/people`, `/v1/tokens`). `aipipe login` asks the hub for a person's token with their
password and TOTP code and prints it: `export AIPIPE_TOKEN=$(aipipe login ...)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.table import Table

from aipipe.cli.at_rest import at_rest_key
from aipipe.cli.options import JSON, client
from aipipe.cli.render import console, emit_json, err_console
from aipipe.errors import ConfigError
from aipipe.hub.hub import OPERATOR, Hub
from aipipe.wire.people import DEFAULT_LIFETIME_S, PersonAdd, ServiceTokenIssue, TokenRequest

user_app = typer.Typer(help="People who obtain API tokens with a TOTP code.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens: service tokens, list, revoke.", no_args_is_help=True)
HOME = typer.Option(..., "--home", help="The hub home directory.")
ROLE = typer.Option(..., "--role", help="admin, scientist or auditor.")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")
M = TypeVar("M", bound=BaseModel)
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def register(hub_app: typer.Typer, root: typer.Typer) -> None:
    hub_app.add_typer(user_app, name="user")
    hub_app.add_typer(token_app, name="token")
    root.command("login")(login)


def duration(text: str, option: str) -> float:
    """'90', '30m', '8h' or '30d' as seconds."""
    match = _DURATION.match(text.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r} is not a duration; write e.g. 3600, 30m, 8h or 30d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


# -- people --------------------------------------------------------------------------------------


@user_app.command("add")
def user_add(name: str, home: Path = HOME, role: str = ROLE, as_json: bool = JSON) -> None:
    """Add a person: prints their one-time password and the otpauth:// URI to load into an
    authenticator app (shown once; hand them over separately)."""
    request = _checked(PersonAdd, name=name, role=role)
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        created = hub.people.add(request.name, request.role, OPERATOR)
    if as_json:
        emit_json(created.model_dump())
        return
    console.print(f"[green]✓[/] {created.name} ({created.role}) added")
    console.print(f"one-time password: {created.password}")
    console.print(f"TOTP (authenticator app): {created.totp_uri}", soft_wrap=True)


@user_app.command("list")
def user_list(home: Path = HOME, as_json: bool = JSON) -> None:
    """People with their role and whether they are locked or disabled."""
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        rows = [p.model_dump() for p in hub.people.people()]
    _table("people", rows, ("name", "role", "created_at", "locked_at", "disabled_at"), as_json)


@user_app.command("disable")
def user_disable(name: str, home: Path = HOME, as_json: bool = JSON) -> None:
    """Disable a person: no more logins, and their tokens are refused from the next request."""
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        info = hub.people.disable(name, OPERATOR)
    _done(info.model_dump(), f"{name} disabled", as_json)


@user_app.command("unlock")
def user_unlock(name: str, home: Path = HOME, as_json: bool = JSON) -> None:
    """Unlock a person locked after repeated failed logins."""
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        info = hub.people.unlock(name, OPERATOR)
    _done(info.model_dump(), f"{name} unlocked", as_json)


# -- tokens --------------------------------------------------------------------------------------


@token_app.command("issue")
def token_issue(
    home: Path = HOME,
    role: str = ROLE,
    name: str = typer.Option(..., "--name", help="What uses it, e.g. 'prometheus'."),
    expires: str = typer.Option(
        None, "--expires", help="Lifetime, e.g. 30d or 12h; default: until revoked."
    ),
    as_json: bool = JSON,
) -> None:
    """Issue a service token (e.g. Prometheus with --role auditor); printed once."""
    expires_s = None if expires is None else duration(expires, "--expires")
    request = _checked(ServiceTokenIssue, name=name, role=role, expires_in_s=expires_s)
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        grant = hub.people.issue(request, OPERATOR)
    if as_json:
        emit_json(grant.model_dump())
        return
    err_console.print(f"token {grant.id} ({grant.role}) expires {grant.expires_at or 'never'}")
    typer.echo(grant.token)


@token_app.command("list")
def token_list(home: Path = HOME, as_json: bool = JSON) -> None:
    """Every API token: id, name, person, role, expiry, revocation, last use (never the token)."""
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        rows = [t.model_dump() for t in hub.people.tokens()]
    columns = ("id", "name", "person", "role", "expires_at", "revoked_at", "last_used")
    _table("API tokens", rows, columns, as_json)


@token_app.command("revoke")
def token_revoke(token_id: str, home: Path = HOME, as_json: bool = JSON) -> None:
    """Revoke a token by its id: refused from the next request on."""
    with Hub.open(home, at_rest_key=at_rest_key()) as hub:
        info = hub.people.revoke(token_id, OPERATOR)
    _done(info.model_dump(), f"token {token_id} revoked", as_json)


# -- login ---------------------------------------------------------------------------------------


def login(
    hub: str = typer.Option(..., "--hub", envvar="AIPIPE_HUB_URL", help="The hub's URL."),
    user: str = typer.Option(..., "--user", help="Your name at the hub."),
    role: str = typer.Option(None, "--role", help="A lesser role than yours (admin only)."),
    lifetime: str = typer.Option("8h", "--lifetime", help="How long the token lives (≤ 12h)."),
    as_json: bool = JSON,
) -> None:
    """Get an API token: asks your password and the code of your authenticator app, prints the
    token (`export AIPIPE_TOKEN=$(aipipe login ...)`; --json for its id and expiry too)."""
    lifetime_s = DEFAULT_LIFETIME_S if lifetime == "8h" else duration(lifetime, "--lifetime")
    password = typer.prompt("password", hide_input=True, err=True)
    code = typer.prompt("TOTP code", err=True)
    request = _checked(TokenRequest, person=user, password=password, totp=code, role=role,
                       lifetime_s=lifetime_s)  # fmt: skip
    with client(hub, "") as hub_client:
        grant = hub_client.login(request)
    if as_json:
        emit_json(grant.model_dump())
        return
    err_console.print(f"token {grant.id} ({grant.role}) expires {grant.expires_at}")
    typer.echo(grant.token)


# -- helpers -------------------------------------------------------------------------------------


def _checked(model: type[M], **fields: object) -> M:
    """`fields` as `model`, or a ConfigError naming the first field that is wrong."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{where}: {first['msg']}") from None


def _table(
    title: str, rows: list[dict[str, object]], columns: tuple[str, ...], as_json: bool
) -> None:
    if as_json:
        emit_json(rows)
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c] or "") for c in columns))
    console.print(table)


def _done(info: dict[str, object], message: str, as_json: bool) -> None:
    if as_json:
        emit_json(info)
    else:
        console.print(f"[green]✓[/] {message}")
