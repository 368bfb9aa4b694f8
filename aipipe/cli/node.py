"""`aipipe node`: set up a node, ingest FHIR data, show its state."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)

from aipipe.cli import node_personal, node_tls
from aipipe.cli.at_rest import KEY_FILE, at_rest_key
from aipipe.cli.attack import enable_attack, parse_attack
from aipipe.cli.node_render import (
    as_of_day_option,
    check_anything_stored,
    print_jwks,
    render_ingest,
    render_predictions,
    render_status,
)
from aipipe.cli.render import console, emit_json, err_console, kv_table
from aipipe.errors import ConfigError
from aipipe.fhir.server import DEFAULT_TYPES
from aipipe.node.home import pinned_fingerprint
from aipipe.node.ingest import IngestReport, total_bytes
from aipipe.node.node import Node
from aipipe.tls import client_context, require_tls_off_loopback, scheme, server_tls

app = typer.Typer(
    help="Run an institution's node: set up, ingest FHIR data, status.", no_args_is_help=True
)

HOME = typer.Option(..., "--home", help="The node home directory.")
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
app.add_typer(node_personal.app, name="personal")
app.add_typer(node_tls.app, name="tls")
app.command("enrol")(node_tls.enrol)


@app.command()
def init(
    home: Path = HOME,
    name: str = typer.Option(..., "--name", help="This institution's node name, e.g. 'cleveland'."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Move an existing node aside (into .replaced-*) and start over; its privacy ledger "
        "(ε spent per study) is carried over. Re-enrol with a token from `enrol-token --replace`.",
    ),
    token: str = typer.Option(
        None,
        "--token",
        envvar="AIPIPE_ENROL_TOKEN",
        help="Enrolment token from `aipipe hub enrol-token`: registers this node with the hub.",
    ),
    hub_ca_file: Path = typer.Option(
        None,
        "--hub-ca",
        help="PEM file of the CA that signs the hub's certificate, for a token that pins none "
        "(a hub whose hub.yaml has no tls_ca): copied into the home and trusted (with the "
        "public CAs) on every call to the hub. A token's pinned CA replaces it.",
    ),
    smart_client_id: str = typer.Option(
        None,
        "--smart-client-id",
        help="Client id the EHR registered for this node (SMART Backend Services): creates "
        "smart.key and prints the public JWK Set to register.",
    ),
    smart_alg: str = typer.Option("ES384", "--smart-alg", help="ES384 (default) or RS384."),
    allow_non_private: bool = typer.Option(
        False,
        "--allow-non-private",
        help="Let this node train studies that say `privacy: none` (off by default).",
    ),
    at_rest_key_file: Path = KEY_FILE,
    as_json: bool = JSON,
) -> None:
    """Create a node home: config, SQLite store, Ed25519 identity key (0600) and audit log.

    With --token the node also enrols with the hub: it sends its public key, never its data.
    With an at-rest key every private file and the raw FHIR in the store are sealed with it.
    """
    if hub_ca_file is not None:
        client_context(hub_ca_file)  # checked before the home is made: a bad file changes nothing
    key = at_rest_key(at_rest_key_file)
    made = Node.init(home, name, force=force, allow_non_private=allow_non_private, at_rest_key=key)
    with made as node:
        if hub_ca_file is not None:
            node.set_hub_ca(hub_ca_file)
        jwks = node.setup_smart(smart_client_id, smart_alg) if smart_client_id else None
        hub_url = node.enrol(token) if token else None
    paths = node.paths
    info = {
        "hub": hub_url or "not enrolled",
        "name": name,
        "home": str(home),
        "store": str(paths.store),
        "identity_key": str(paths.identity_key),
        "audit_log": str(paths.audit_log),
        "at_rest": "not encrypted" if key is None else f"AES-256-GCM, key id {key.key_id}",
    }
    if paths.config.hub_ca_pinned:  # the CA the token pinned: compare with `hub init`'s
        info["hub_ca_sha256"] = pinned_fingerprint(paths)
    if as_json:
        emit_json({**info, "smart_jwks": jwks})
        return
    console.print(f"[green]✓[/] node [bold]{name}[/] created")
    console.print(kv_table("node home", info))
    if jwks is not None:
        print_jwks(paths.config.smart_client_id or "", jwks)


@app.command("smart-jwks")
def smart_jwks(home: Path = HOME) -> None:
    """Print the public JWK Set of this node's SMART client key (safe to share with the EHR)."""
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        client_id, jwks = node.smart_jwks()
    print_jwks(client_id, jwks)


@app.command()
def ingest(
    paths: list[Path] = typer.Argument(
        None, help="NDJSON (Bulk Data) or Bundle JSON files, or directories of them."
    ),
    home: Path = HOME,
    fhir_url: str = typer.Option(None, "--fhir-url", help="Pull from this FHIR R4 server."),
    since: str = typer.Option(
        None,
        "--since",
        help="With --fhir-url: only resources updated after this instant "
        "(default: each type's cursor from the last sync).",
    ),
    page_size: int = typer.Option(
        100, "--page-size", min=1, max=1000, help="With --fhir-url: resources per page (_count)."
    ),
    types: str = typer.Option(
        ",".join(DEFAULT_TYPES),
        "--types",
        help="With --fhir-url: comma-separated resource types to pull.",
    ),
    as_json: bool = JSON,
) -> None:
    """Load FHIR R4 data into the node store: files, or a server with incremental sync.

    Re-ingesting the same data stores nothing twice; a newer version of a resource replaces
    the older one. Bad resources are counted and reported, never stored half-way.

    Examples:

        aipipe node ingest --home ./node examples/heart-disease/fhir/cleveland

        aipipe node ingest --home ./node --fhir-url https://ehr.example.org/fhir
    """
    if bool(paths) == bool(fhir_url):
        raise ConfigError("give either files/directories or --fhir-url, not both or neither")
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        if fhir_url:
            report = _pull(node, fhir_url, since, page_size, types.split(","), as_json)
        else:
            report = _load_files(node, paths, as_json)
    render_ingest(report, as_json)
    check_anything_stored(report)


def _load_files(node: Node, paths: list[Path], quiet: bool) -> IngestReport:
    total = total_bytes(paths)
    columns = (TextColumn("ingest"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=quiet) as progress:
        task = progress.add_task("ingest", total=total)
        return node.ingest_files(paths, lambda n: progress.advance(task, n))


def _pull(
    node: Node, url: str, since: str | None, page_size: int, types: list[str], quiet: bool
) -> IngestReport:
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        console=err_console,
        transient=True,
        disable=quiet,
    ) as progress:
        task = progress.add_task("pulling", total=None)
        count = 0

        def tick(rtype: str) -> None:
            nonlocal count
            count += 1
            progress.update(task, description=f"pulling {rtype}: {count} resources")

        return node.ingest_server(
            url, since=since, page_size=page_size, types=types, on_resource=tick
        )


@app.command()
def status(home: Path = HOME, as_json: bool = JSON) -> None:
    """Show resource counts per type, the last sync and the incremental-sync cursors."""
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        info = node.status()
    render_status(info, as_json)


@app.command()
def approve(
    study_name: str = typer.Argument(..., help="The study's name as published on the hub."),
    home: Path = HOME,
    epsilon: float = typer.Option(
        None,
        "--epsilon",
        min=0.0,
        help="The study's share of this site's ε (default: the study's privacy.epsilon); "
        "the site's total over all studies is set by `aipipe privacy budget`.",
    ),
    as_json: bool = JSON,
) -> None:
    """Approve a published study: pins its digest; a changed study needs a new approval.

    Also sets the study's (ε, δ) share of the site's budget: every release must fit both the
    share and the site's total over all studies. The node trains for no study it has not approved.
    """
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        approval = node.approve(study_name, epsilon=epsilon)
    result = {
        "study": approval.study,
        "digest": approval.digest,
        "epsilon_budget": approval.epsilon_budget,
        "columns": approval.columns,
    }
    if as_json:
        emit_json(result)
        return
    console.print(f"[green]✓[/] approved study [bold]{approval.study}[/] ({approval.digest[:12]})")
    console.print(kv_table("approval", result))


@app.command()
def start(
    home: Path = HOME,
    once: bool = typer.Option(False, "--once", help="Do the pending work, then exit."),
    poll: float = typer.Option(
        10.0, "--poll", min=0.0, max=60.0, help="Long-poll wait in seconds."
    ),
    threads: int = typer.Option(
        1, "--threads", min=1, max=256, help="Torch threads; 1 suits a study's small models."
    ),
    attack: str = typer.Option(None, "--attack", hidden=True, help="Test harness: NAME[:PARAM]."),
) -> None:
    """Run the node daemon: poll the hub, train and evaluate, until SIGTERM (or --once).

    --threads: a study's models are small and its batches a few rows, where torch's threads
    cost more than they save (bench/round_overhead.py: a personalized round took 3.99× a plain
    one with torch's default threads on 2 cores, 1.25× with one); raise it for wide MLPs."""
    import torch  # not at module level: `aipipe --help` imports no torch

    torch.set_num_threads(threads)
    poison = parse_attack(attack) if attack else None
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        log = functools.partial(err_console.log, f"[{node.name}]")
        if poison is not None:
            enable_attack(node, poison)
        done = node.daemon(log, poll_wait_s=poll, attack=poison).run(once=once)
    err_console.log(f"[{node.name}] stopped after {done} work items")


@app.command()
def predict(
    home: Path = HOME,
    study: str = typer.Option(..., "--study", help="An approved study with a trained model."),
    write_back: bool = typer.Option(
        False, "--write-back", help="Write each score to the EHR as a FHIR RiskAssessment."
    ),
    fhir_url: str = typer.Option(
        None, "--fhir-url", help="With --write-back: the EHR's FHIR R4 base URL."
    ),
    as_of: str = typer.Option(
        None, "--as-of", help="Score as of this day (YYYY-MM-DD: data through it); default now."
    ),
    as_json: bool = JSON,
) -> None:
    """Score this site's patients with the study's current federated model (the site's personal
    model when the study personalizes: `aipipe node personal`).

    Patients are scored as of now (or --as-of): every Observation dated up to that day counts,
    age is taken then. With --write-back each score becomes a RiskAssessment (status final,
    method = the model version, occurrence = the as-of time, basis = the Observations used),
    written by conditional update on the identifier a CDS card's suggestion also carries, so a
    re-run or an accepted card updates the same resource. Output names patients only by pseudonym.
    """
    if write_back and not fhir_url:
        raise ConfigError("--write-back needs --fhir-url, the EHR's FHIR base URL")
    as_of_day = as_of_day_option(as_of)
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        scores = node.predict(
            study, as_of=as_of_day, write_back_to=fhir_url if write_back else None
        )
    render_predictions(scores, as_json)


@app.command("serve-cds")
def serve_cds(
    home: Path = HOME,
    study: list[str] = typer.Option(..., "--study", help="Approved studies to serve (repeat)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8710, "--port", min=0, max=65535, help="Port to listen on."),
    jwks: Path = typer.Option(
        None,
        "--cds-clients",
        help="JSON file mapping each allowed CDS client `iss` to its JWK Set: every call "
        "needs a JWT (ES384/RS384) from one of them. Without it, calls are refused (401) unless "
        "--allow-unauthenticated.",
    ),
    allow_unauthenticated: bool = typer.Option(
        False,
        "--allow-unauthenticated",
        help="Serve calls without a client JWT; only with a loopback --host (tests, demos).",
    ),
    fhir_allow: list[str] = typer.Option(
        [],
        "--fhir-allow",
        help="FHIR base URL (https) a request's fhirServer may name (repeat); any other "
        "fhirServer is never contacted.",
    ),
    fhir_ca_bundle: Path = typer.Option(
        None, "--fhir-ca-bundle", help="PEM file of extra CAs for the --fhir-allow servers."
    ),
    tls_cert: Path = typer.Option(
        None, "--tls-cert", help="PEM certificate chain to serve HTTPS with (TLS 1.2 or newer)."
    ),
    tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert."),
    insecure_http: bool = typer.Option(
        False,
        "--insecure-http",
        help="Serve plain HTTP on a non-loopback --host (only behind a TLS-terminating proxy).",
    ),
    link_hours: float = typer.Option(
        24.0,
        "--model-card-link-hours",
        min=0.01,
        max=90 * 24,
        help="How long the signed model card link on a card opens without a JWT.",
    ),
) -> None:
    """Serve CDS Hooks for approved studies from inside the hospital (PHI stays on site).

    Off a loopback --host it serves HTTPS only: give --tls-cert and --tls-key."""
    from aipipe.cds.limits import require_loopback

    if allow_unauthenticated:
        require_loopback(host, "--allow-unauthenticated")
    tls = server_tls(tls_cert, tls_key, "--tls-cert/--tls-key")
    require_tls_off_loopback(host, tls, insecure_http=insecure_http,
                             how="give --tls-cert and --tls-key")  # fmt: skip
    import uvicorn

    from aipipe.cds import JwtPolicy

    with Node.open(home, at_rest_key=at_rest_key()) as node:
        policy = JwtPolicy(json.loads(jwks.read_text())) if jwks else None
        fhir = _fhir_access(fhir_allow, fhir_ca_bundle)
        app_ = node.cds_app(study, jwt=policy, fhir=fhir,
                            allow_unauthenticated=allow_unauthenticated,
                            link_lifetime_s=link_hours * 3600)  # fmt: skip
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
        url = f"{scheme(tls)}://{shown}:{port}/cds-services"
        err_console.log(f"[{node.name}] CDS Hooks at {url}")
        uvicorn.run(app_, host=host, port=port, log_level="warning", access_log=False,
                    **({} if tls is None else tls.uvicorn_options()))  # fmt: skip


def _fhir_access(servers: list[str], ca_bundle: Path | None) -> Any:
    """The FhirAccess for `serve-cds --fhir-allow/--fhir-ca-bundle` (ConfigError if unusable)."""
    from aipipe.cds import FhirAccess

    for server in servers:
        if not server.startswith("https://"):
            raise ConfigError(
                f"--fhir-allow {server!r} is not an https URL; give the FHIR base URL"
            )
    try:
        return FhirAccess(
            allowed_servers=tuple(servers),
            ca_bundle=None if ca_bundle is None else str(ca_bundle),
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--fhir-allow/--fhir-ca-bundle: {exc}") from exc
