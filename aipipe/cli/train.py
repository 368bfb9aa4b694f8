"""`aipipe train`: open rounds on the hub and follow them to the end."""

from __future__ import annotations

import io
import time

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from aipipe.cli.options import HUB, JSON, TOKEN, client
from aipipe.cli.render import console, emit_json
from aipipe.node.client import HubClient
from aipipe.wire import RoundInfo, RoundState

app = typer.Typer(help="Run federated training rounds.", no_args_is_help=True)

STUDY = typer.Option(..., "--study", help="The published study's name.")
DEADLINE = typer.Option(
    None,
    "--deadline",
    min=1.0,
    help="Seconds until the round closes with whoever reported "
    "(default: the study's round_deadline_s).",
)
_ENDED = (RoundState.CLOSED, RoundState.FAILED)
WAIT_S = 10.0  # each long-poll on the round; the hub answers as soon as it changes


@app.command("round")
def one_round(
    study: str = STUDY,
    wait: bool = typer.Option(False, "--wait", help="Show live progress until the round ends."),
    deadline: float = DEADLINE,
    hub: str = HUB,
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """Open one round of a study (and with --wait follow it until it closes or fails)."""
    with client(hub, token) as hub_client:
        info = hub_client.open_round(study, deadline)
        if wait:
            info = _follow(hub_client, info, live=not as_json)
    if as_json:
        emit_json(info.model_dump(mode="json"))
    elif not wait:
        console.print(f"opened round {info.round} of {study} for {len(info.selected)} nodes")
    if info.state == RoundState.FAILED:
        raise typer.Exit(1)


@app.command()
def run(
    study: str = STUDY,
    rounds: int = typer.Option(..., "--rounds", min=1, help="How many rounds to run."),
    deadline: float = DEADLINE,
    hub: str = HUB,
    token: str = TOKEN,
    as_json: bool = JSON,
) -> None:
    """Run N rounds one after another, printing a row per round ('evaluated': the nodes that
    evaluated the new global model on their own test splits; the metrics stay on the nodes)."""
    results: list[RoundInfo] = []
    table = _summary_table()
    quiet = Console(file=io.StringIO()) if as_json else console  # --json: stdout is JSON only
    with (
        client(hub, token) as hub_client,
        Live(table, console=quiet, auto_refresh=False) as live,
    ):
        for _ in range(rounds):
            info = _follow(hub_client, hub_client.open_round(study, deadline), live=False)
            if info.state == RoundState.CLOSED:
                info = _wait_metrics(hub_client, info)
            results.append(info)
            if not as_json:
                table.add_row(*_summary_row(info))
                live.refresh()
            if info.state == RoundState.FAILED:
                break
    if as_json:
        emit_json([r.model_dump(mode="json") for r in results])
    if results[-1].state == RoundState.FAILED:
        console.print(f"[red]round {results[-1].round} failed:[/] {results[-1].reason}")
        raise typer.Exit(1)


def _follow(hub_client: HubClient, info: RoundInfo, *, live: bool) -> RoundInfo:
    if not live:
        while info.state not in _ENDED:
            info = hub_client.round(info.study, info.round, changed_from=info, wait_s=WAIT_S)
        return info
    with Live(_progress_table(info), console=console, auto_refresh=False) as view:
        while info.state not in _ENDED:
            info = hub_client.round(info.study, info.round, changed_from=info, wait_s=WAIT_S)
            view.update(_progress_table(info), refresh=True)
    return info


def _wait_metrics(hub_client: HubClient, info: RoundInfo, timeout_s: float = 60.0) -> RoundInfo:
    """Give the nodes time to evaluate the new model on their test splits."""
    end = time.monotonic() + timeout_s
    while len(info.metrics) < len(info.reported) and time.monotonic() < end:
        info = hub_client.round(info.study, info.round, changed_from=info, wait_s=WAIT_S)
    return info


def _progress_table(info: RoundInfo) -> Table:
    stage = f" ({info.stage})" if info.stage else ""
    title = f"{info.study} round {info.round}: {info.state}{stage}"
    table = Table(title=title, title_justify="left")
    table.add_column("node")
    table.add_column("status")
    for node in info.selected:
        status = (
            "reported"
            if node in info.reported
            else f"declined: {info.declined[node]}"
            if node in info.declined
            else "training…"
        )
        table.add_row(node, status)
    if info.reason:
        table.caption = info.reason
    return table


def _summary_table() -> Table:
    table = Table(title="rounds", title_justify="left")
    for column in ("round", "state", "nodes", "evaluated", "model"):
        table.add_column(column, justify="right" if column not in ("state", "model") else "left")
    return table


def _summary_row(info: RoundInfo) -> list[str]:
    return [
        str(info.round),
        info.state,
        f"{len(info.reported)}/{len(info.selected)}",
        f"{len(info.metrics)}/{len(info.reported)}",
        (info.result_version or "")[:12],
    ]
