"""`aipipe privacy`: the node's site ledger: the site total, each study's share, what is spent.

The patients are the same whichever study asks, so every release of every study is charged to
one site total that the data steward sets (`privacy budget --site-epsilon`); `node approve` sets
each study's share of it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from aipipe.cli.at_rest import at_rest_key
from aipipe.cli.options import JSON
from aipipe.cli.render import console, emit_json, kv_table
from aipipe.node.node import Node

app = typer.Typer(help="Watch and set the node's privacy budget.", no_args_is_help=True)

HOME = typer.Option(..., "--home", help="The node home.")


@app.command()
def status(home: Path = HOME, as_json: bool = JSON) -> None:
    """The site's total ε and what all studies spent of it (composed together), then per study
    its share and spent, each beside the best accuracy a membership-inference attacker can
    reach at that (ε, δ) (50/50 prior; 0.5 is a coin flip)."""
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        report = _status(node.store)
    if as_json:
        emit_json(report)
        return
    if report["site"] is not None:
        console.print(kv_table("site budget (all studies together)", report["site"]))
    shares = [{k: v for k, v in s.items() if not k.startswith("group")} for s in report["studies"]]
    console.print(_table("study shares", shares))
    groups = [
        {"study": s["study"], **{k: v for k, v in s.items() if k.startswith("group")}}
        for s in report["studies"]
    ]
    console.print(_table("accounting groups (disjoint cohorts are accounted apart)", groups))


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    if rows:
        for column in rows[0]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    return table


@app.command()
def budget(
    home: Path = HOME,
    site_epsilon: float = typer.Option(
        ...,
        "--site-epsilon",
        min=0.0,
        help="The site's total ε over all studies and queries on its patients.",
    ),
    delta: float = typer.Option(
        1e-5, "--delta", min=0.0, max=1.0, help="The site's δ (ε is composed at this δ)."
    ),
    as_json: bool = JSON,
) -> None:
    """Set the site's total (ε, δ). Each study also keeps its own share (`node approve
    --epsilon`); a release must fit both. Until this is set, the total is the largest share."""
    with Node.open(home, at_rest_key=at_rest_key()) as node:
        spent = node.set_site_budget(epsilon=site_epsilon, delta=delta)
    result = {"epsilon_budget": site_epsilon, "delta": delta, "spent": spent}
    if as_json:
        emit_json(result)
        return
    console.print(kv_table("site budget", result))


def _status(store: Any) -> dict[str, Any]:
    from aipipe.privacy.ledger import BudgetLedger  # imports torch: only when needed
    from aipipe.privacy.protection import membership_accuracy_bound

    ledger = BudgetLedger(store.db)
    studies = [
        {
            **{k: v for k, v in dataclasses.asdict(s).items() if k != "group"},
            "attacker_accuracy_max": membership_accuracy_bound(s.spent, s.delta),
            **_cohort(s.group),
        }
        for s in ledger.status()
    ]
    site = ledger.site_budget()
    if site is None:
        return {"site": None, "studies": studies}
    spent = ledger.site_spent()
    return {
        "site": {
            "epsilon_budget": site.epsilon,
            "delta": site.delta,
            "set": "by the steward" if site.explicit else "default: the largest study share",
            "spent": spent,
            "remaining": max(site.epsilon - spent, 0.0),
            "releases": len(ledger.entries()),
            "composed": "largest group: shared studies together, each disjoint cohort apart",
            "attacker_accuracy_max": membership_accuracy_bound(spent, site.delta),
        },
        "studies": studies,
    }


def _cohort(group: Any) -> dict[str, Any]:
    """The study's accounting group: shared with the site, or apart as a verified disjoint
    cohort (parallel composition), with when and why."""
    if group is None:
        return {
            "group": "none yet (checked at its first release)",
            "group_since": None,
            "group_reason": "",
        }
    label = "disjoint (verified)" if group.group == "disjoint" else "shared"
    return {"group": label, "group_since": group.since or None, "group_reason": group.reason}
