"""`aipipe audit`: export and verify the hash-chained audit log of a node or hub home.

The log is ``<home>/audit.sqlite`` (or the ``audit_log`` a node's ``node.yaml`` names) and the
owner's key ``<home>/identity.key``; a checkpoint signed by any other key fails `verify`.
`export` signs the head first and writes it beside the export (``<out>.anchor``): keep that
anchor elsewhere, and `verify --anchor` later proves the log still holds it.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import typer
from rich.markup import escape

from aipipe.audit import Action, Anchor, AuditLog, VerifyReport, export, verify, verify_jsonl
from aipipe.cli.at_rest import at_rest_key
from aipipe.cli.render import AipipeGroup, console, emit_json
from aipipe.errors import ConfigError
from aipipe.hub.home import HUB_CONFIG, load_hub
from aipipe.secure.at_rest import PLAIN, home_at_rest
from aipipe.secure.identity import Identity
from aipipe.settings import NODE_CONFIG, load_node_config

app = typer.Typer(
    cls=AipipeGroup,
    help="Export and verify the tamper-evident audit log of a node or hub.",
    no_args_is_help=True,
)

AUDIT_LOG = "audit.sqlite"
IDENTITY_KEY = "identity.key"

JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")


class ExportFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"
    FHIR = "fhir"


@dataclass(frozen=True)
class _Home:
    log: Path
    identity: Identity | None
    owner: str | None


def _open_home(home: Path) -> _Home:
    """Where a node or hub home keeps its log and key; a node's node.yaml may rename them."""
    if not home.is_dir():
        raise ConfigError(f"no node or hub home at {home}")
    at_rest = PLAIN
    if (home / NODE_CONFIG).is_file():
        paths = load_node_config(home)
        log, key, owner = paths.audit_log, paths.identity_key, paths.config.name
        at_rest = home_at_rest(f"node home {home}", paths.config.at_rest, at_rest_key())
    else:
        log, key, owner = home / AUDIT_LOG, home / IDENTITY_KEY, None
        if (home / HUB_CONFIG).is_file():  # an encrypted hub's identity key is sealed
            at_rest = load_hub(home, at_rest_key()).at_rest
    identity = Identity.load(key, at_rest=at_rest) if key.exists() else None
    return _Home(log, identity, owner)


def _actor() -> str:
    try:
        return f"user:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name in this environment (a bare container)
        return "user:unknown"


@app.command("export")
def export_command(
    home: Path = typer.Option(..., "--home", help="The node or hub home directory."),
    fmt: ExportFormat = typer.Option(
        ..., "--format", help="jsonl (re-verifiable), csv, or fhir (an R4 AuditEvent Bundle)."
    ),
    out: Path = typer.Option(..., "--out", help="The file to write (replaced if it exists)."),
    as_json: bool = JSON,
) -> None:
    """Write the audit log to a file and record the export in the log itself.

    The head is signed first, so the export ends in a checkpoint; that signed head (the anchor)
    is printed and written to OUT.anchor, to be kept apart from the log.
    """
    where = _open_home(home)
    with AuditLog.open(where.log, where.identity) as log:  # closing signs the export event
        signed = log.checkpoint() if where.identity is not None else None
        anchor = None if signed is None else Anchor.from_checkpoint(signed)
        count = export(where.log, fmt.value, out, observer=where.owner)
        log.append(
            Action.AUDIT_EXPORT,
            actor=_actor(),
            resource="audit-log",
            details={"format": fmt.value, "events": count, "file": out.name}
            | ({} if anchor is None else {"anchor_seq": anchor.seq}),
        )
    anchor_file = None if anchor is None else _write_anchor(out, anchor)
    if as_json:
        emit_json({
            "format": fmt.value, "events": count, "out": str(out),
            "anchor": None if anchor is None else anchor.compact(),
            "anchor_file": None if anchor_file is None else str(anchor_file),
        })  # fmt: skip
        return
    console.print(f"[green]✓[/] exported {count} audit events as {fmt.value} to {out}")
    if anchor is None:
        console.print("[yellow]![/] no identity key in the home: the head was not signed")
        return
    console.print(f"  signed head (anchor) at event {anchor.seq}, kept in {anchor_file}:")
    console.print(f"  {anchor.compact()}", soft_wrap=True)


def _write_anchor(out: Path, anchor: Anchor) -> Path:
    path = out.with_name(f"{out.name}.anchor")
    try:
        path.write_text(anchor.compact() + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write the audit anchor {path}: {exc.strerror}") from exc
    return path


@app.command("verify")
def verify_command(
    home: Path | None = typer.Option(None, "--home", help="The node or hub home directory."),
    jsonl: Path | None = typer.Option(
        None, "--jsonl", help="Verify a JSONL export instead of a home's database."
    ),
    key: str | None = typer.Option(
        None, "--key", help="Trust checkpoints signed by this hex Ed25519 public key only."
    ),
    anchor_value: str | None = typer.Option(
        None,
        "--anchor",
        help="A signed head kept outside the log (an export's .anchor file, a node's "
        "hub-audit-head file, or the value itself): the log must still hold it.",
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Fail if any event comes after the last signed checkpoint."
    ),
    as_json: bool = JSON,
) -> None:
    """Prove the hash chain unbroken, checkpointed as the log promises, signed by the owner's key.

    Exits non-zero at the first break, naming the first bad sequence number. With --anchor the
    anchor's key is the trusted one (unless --key names another).
    """
    if home is not None and jsonl is not None:
        raise ConfigError("pass either --home DIR or --jsonl FILE, not both")
    where = None if home is None else _open_home(home)
    anchor = None if anchor_value is None else Anchor.load(anchor_value)
    trusted = _trusted_keys(key, where, anchor)
    if where is not None:
        report = verify(where.log, trusted_keys=trusted, anchor=anchor, strict=strict)
    elif jsonl is not None:
        report = verify_jsonl(jsonl, trusted_keys=trusted, anchor=anchor, strict=strict)
    else:
        raise ConfigError("pass --home DIR (a node or hub home) or --jsonl FILE (an export)")
    if as_json:
        emit_json({"valid": True, **report.to_dict()})
        return
    _render(report)


def _trusted_keys(
    key: str | None, where: _Home | None, anchor: Anchor | None
) -> list[bytes] | None:
    """The keys checkpoints must be signed by: --key, else the anchor's (kept outside the home,
    so a replaced identity.key cannot vouch for a recreated log), else the home's, else any."""
    if key is not None:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ConfigError(f"--key {key!r} is not a 64-digit hex Ed25519 public key")
        return [raw]
    if anchor is not None:
        return [bytes.fromhex(anchor.public_key)]
    if where is None or where.identity is None:
        return None
    return [where.identity.public_bytes]


def _render(report: VerifyReport) -> None:
    console.print(
        f"[green]✓[/] audit chain intact: {report.events} events, "
        f"{report.checkpoints} signed checkpoints verified"
    )
    rows = {
        "first event": report.first_time or "-",
        "last event": report.last_time or "-",
        "head hash": report.head_hash,
        "signed by": ", ".join(report.signers) or "-",
        "cadence": f"a checkpoint every {report.checkpoint_every} events"
        if report.checkpoint_every
        else "-",
        "anchored at": "-" if report.anchored_at is None else f"event {report.anchored_at}",
    }
    for label, value in rows.items():  # whole hashes and keys: an auditor copies them
        console.print(f"  {label:<12} {escape(value)}", soft_wrap=True)
    if report.unanchored:
        console.print(
            f"[yellow]![/] {report.unanchored} events after the last checkpoint are not signed "
            "yet (normal while the process runs; it signs them when it stops)"
        )
    if report.events and not report.checkpoints:
        console.print(
            "[yellow]![/] no signed checkpoint: a rewrite of the whole log would go unnoticed; "
            "keep the head hash somewhere else"
        )
    elif report.checkpoints and not report.pinned:
        console.print(
            "[yellow]![/] checkpoint keys were not pinned (no identity key, no --key): "
            "compare 'signed by' with the owner's public key"
        )
