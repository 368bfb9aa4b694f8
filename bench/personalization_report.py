"""Summaries, rich tables and targets of bench/personalization.py (kept apart to stay readable)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flamby_heart import SITES, _mean_std
from rich.table import Table

# Published anchors, mean per-site test accuracy on Fed-Heart-Disease without DP.
ANCHORS = {
    "FLamby FedYogi (best global)": 0.731,
    "FL4Health FENDA-FL": 0.812,
    "FL4Health PerFCL": 0.772,
    "FL4Health FedPer": 0.706,
}
TARGETS = {"accuracy_no_dp": 0.82, "accuracy_dp": 0.78, "cost_ratio": 1.2}
BASELINES = ("solo", "global")


def _mean_auc(test: Sequence[Mapping[str, Any]], skip: str | None = None) -> float:
    aucs = [
        t["auc"]
        for t, name in zip(test, SITES, strict=True)
        if t["auc"] is not None and name != skip
    ]
    return float(np.mean(aucs))


def summarise(seeds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of the per-site mean test accuracy and AUC; per-site means."""
    tests = [[s["sites"][name]["test"] for name in SITES] for s in seeds]
    accuracy = _mean_std([float(np.mean([t["accuracy"] for t in test])) for test in tests])
    epsilons = [max(s["epsilon"].values()) for s in seeds if s["epsilon"]]
    return {
        "accuracy_mean": accuracy[0],
        "accuracy_std": accuracy[1],
        "auc_mean_std": _mean_std([_mean_auc(t) for t in tests]),
        "auc_without_switzerland_mean_std": _mean_std(
            [_mean_auc(t, skip="switzerland") for t in tests]
        ),
        "per_site_accuracy": {
            name: statistics.fmean(s["sites"][name]["test"]["accuracy"] for s in seeds)
            for name in SITES
        },
        "max_epsilon": max(epsilons) if epsilons else None,
    }


def _cell(summary: Mapping[str, Any] | None, key: str = "accuracy") -> str:
    if summary is None:
        return ""
    if key == "accuracy":
        return f"{summary['accuracy_mean']:.3f} ± {summary['accuracy_std']:.3f}"
    return "{:.3f} ± {:.3f}".format(*summary[key])


def family_of(label: str) -> str:
    return "mlp" if label.endswith("(mlp)") else "logistic"


def baseline_label(base: str, family: str) -> str:
    return base if family == "logistic" else f"{base} (mlp)"


def render_main(summaries: Mapping[tuple[str, bool], Mapping[str, Any]]) -> Table:
    table = Table(title="(a) Fed-Heart-Disease: mean per-site test accuracy, mean ± std over seeds")
    table.add_column("strategy")
    for mode in ("no DP", "ε = 1"):
        for what in ("accuracy", "AUC (4)", "AUC (no CH)"):
            table.add_column(f"{what}, {mode}", justify="right")
    table.add_column("ε spent (max site)", justify="right")
    labels = list(dict.fromkeys(label for label, _ in summaries))
    for label in labels:
        cells = []
        for dp in (False, True):
            s = summaries.get((label, dp))
            cells += [
                _cell(s),
                _cell(s, "auc_mean_std"),
                _cell(s, "auc_without_switzerland_mean_std"),
            ]
        spent = (summaries.get((label, True)) or {}).get("max_epsilon")
        cells.append("" if spent is None else f"{spent:.3f}")
        table.add_row(label, *cells, end_section=label == labels[-1])
    for name, value in ANCHORS.items():
        table.add_row(f"[dim]{name} (published)[/dim]", f"{value:.3f}", *[""] * 6)
    return table


def site_wins(
    summaries: Mapping[tuple[str, bool], Mapping[str, Any]], *, strict: bool = False
) -> dict[str, Any]:
    """Per personalized strategy and mode: at each site, is it ≥ max(solo, global) of its own
    model family (mean over seeds)? `strict`: ≥ the best of solo and global on either model."""
    out: dict[str, Any] = {}
    for (label, dp), s in summaries.items():
        if label.split(" (")[0] in BASELINES:
            continue
        family = family_of(label)
        families = ("logistic", "mlp") if strict else (family,)
        refs = [summaries.get((baseline_label(b, f), dp)) for b in BASELINES for f in families]
        if any(r is None for r in refs):
            continue
        sites = {}
        for name in SITES:
            bar = max(r["per_site_accuracy"][name] for r in refs if r is not None)
            ours = s["per_site_accuracy"][name]
            sites[name] = {"personalized": ours, "max_solo_global": bar, "met": ours >= bar}
        out[f"{label}|{'dp' if dp else 'none'}"] = {
            "strategy": label,
            "dp": dp,
            "sites": sites,
            "all_met": all(v["met"] for v in sites.values()),
        }
    return out


def site_cells(
    per_site: Mapping[str, float], win: Mapping[str, Any] | None
) -> tuple[list[str], str]:
    """A strategy's accuracy at each site, marked ✓ or ✗ against max(solo, global) when `win`
    has its comparison, and the all-sites verdict."""
    cells = []
    for name in SITES:
        cell = f"{per_site[name]:.3f}"
        if win is not None:
            cell += " ✓" if win["sites"][name]["met"] else " ✗"
        cells.append(cell)
    return cells, "" if win is None else ("✓" if win["all_met"] else "✗")


def render_sites(
    summaries: Mapping[tuple[str, bool], Mapping[str, Any]], wins: Mapping[str, Any]
) -> Table:
    table = Table(title="(b) per site: test accuracy, mean over seeds (✓: ≥ max(solo, global))")
    table.add_column("strategy")
    table.add_column("DP")
    for name in SITES:
        table.add_column(name, justify="right")
    table.add_column("all 4", justify="center")
    for dp in (False, True):
        for (label, mode), s in summaries.items():
            if mode != dp:
                continue
            win = wins.get(f"{label}|{'dp' if dp else 'none'}")
            cells, verdict = site_cells(s["per_site_accuracy"], win)
            table.add_row(label, "ε=1" if dp else "–", *cells, verdict)
        table.add_section()
    return table


def render_cost(costs: Mapping[tuple[str, bool], Mapping[str, Any]]) -> Table:
    table = Table(
        title="(c) node-side work per site and round (train_round + personalize), median ms; "
        "none: the same model and training without personalization, alternated in this run"
    )
    columns = ("strategy", "DP", "wall", "train", "personalize", "none", "ratio", "CPU ratio")
    for column in columns:
        table.add_column(column, justify="left" if column in ("strategy", "DP") else "right")
    for (label, dp), c in costs.items():
        m = c["method"]
        table.add_row(
            label,
            "ε=1" if dp else "–",
            f"{1000 * m['wall_s']:.1f}",
            f"{1000 * m['train_round_wall_s']:.1f}",
            f"{1000 * m['personalize_wall_s']:.1f}",
            f"{1000 * c['none']['wall_s']:.1f}",
            f"{c['ratio']:.2f}×",
            f"{c['ratio_cpu']:.2f}×",
        )
    return table


def win_record(wins: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "met_by": [
            w["strategy"] + (" ε=1" if w["dp"] else "") for w in wins.values() if w["all_met"]
        ],
        "sites_met": {k: sum(v["met"] for v in w["sites"].values()) for k, w in wins.items()},
    }


def targets(
    summaries: Mapping[tuple[str, bool], Mapping[str, Any]],
    wins: Mapping[str, Any],
    costs: Mapping[tuple[str, bool], Mapping[str, Any]],
) -> dict[str, Any]:
    """Each target: the best personalized strategy against it, and which strategies meet it."""
    personalized = {k: s for k, s in summaries.items() if k[0].split(" (")[0] not in BASELINES}
    out: dict[str, Any] = {}
    for dp, key in ((False, "accuracy_no_dp"), (True, "accuracy_dp")):
        accs = {
            label: s["accuracy_mean"] for (label, mode), s in personalized.items() if mode == dp
        }
        best = max(accs, key=accs.__getitem__) if accs else None
        out[key] = {
            "target": TARGETS[key],
            "best": best,
            "best_accuracy": accs[best] if best else None,
            "gap": TARGETS[key] - accs[best] if best else None,
            "met_by": [label for label, acc in accs.items() if acc >= TARGETS[key]],
        }
    out["every_site"] = win_record(wins)
    out["every_site_against_both_models"] = win_record(site_wins(summaries, strict=True))
    out["cost_ratio"] = {
        "target": TARGETS["cost_ratio"],
        "ratios": {
            f"{label}|{'dp' if dp else 'none'}": c["ratio"] for (label, dp), c in costs.items()
        },
        "met_by": [
            f"{label}|{'dp' if dp else 'none'}"
            for (label, dp), c in costs.items()
            if c["ratio"] <= TARGETS["cost_ratio"]
        ],
    }
    return out


# -- markdown for docs/BENCHMARKS.md, from a results file ---------------------------------------


def markdown(report: Mapping[str, Any]) -> str:
    """Tables (a), (b) and (c) of a results file as markdown: the docs quote the JSON as is."""
    rows = {(r["strategy"], r["dp"]): r for r in report["results"]}
    labels = list(dict.fromkeys(label for label, _ in rows))
    lines = [
        "| strategy | chosen (no DP) | accuracy, no DP | AUC (4) | AUC (no CH) "
        "| chosen (ε = 1) | accuracy, ε = 1 | AUC (4) | AUC (no CH) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        cells = [label]
        for dp in (False, True):
            r = rows.get((label, dp))
            if r is None:
                cells += ["", "", "", ""]
                continue
            s = r["summary"]
            cells += [
                _chosen(r["chosen"]),
                _cell(s),
                _cell(s, "auc_mean_std"),
                _cell(s, "auc_without_switzerland_mean_std"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, value in ANCHORS.items():
        lines.append(f"| {name} (published) | | {value:.3f} | | | | | | |")
    lines += ["", "| strategy | DP | " + " | ".join(SITES) + " | all 4 |", "|---|---|"]
    lines[-1] += "---|" * (len(SITES) + 1)
    wins = site_wins({key: r["summary"] for key, r in rows.items()})
    for dp in (False, True):
        for label in labels:
            r = rows.get((label, dp))
            if r is None:
                continue
            win = wins.get(f"{label}|{'dp' if dp else 'none'}")
            cells, verdict = site_cells(r["summary"]["per_site_accuracy"], win)
            lines.append(
                f"| {label} | {'ε = 1' if dp else '–'} | " + " | ".join(cells) + f" | {verdict} |"
            )
    strict = win_record(site_wins({key: r["summary"] for key, r in rows.items()}, strict=True))
    lines += [
        "",
        "Against the best solo or global on either model, sites met: "
        + ", ".join(f"{k} {v}/4" for k, v in strict["sites_met"].items()),
    ]
    lines += [
        "",
        "| strategy | DP | train_round + personalize (ms) | personalize (ms) | none (ms) "
        "| ratio (wall) | ratio (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, dp), r in rows.items():
        c = r.get("cost")
        if c is None:
            continue
        m = c["method"]
        lines.append(
            f"| {label} | {'ε = 1' if dp else '–'} | {1000 * m['wall_s']:.1f} "
            f"| {1000 * m['personalize_wall_s']:.1f} | {1000 * c['none']['wall_s']:.1f} "
            f"| {c['ratio']:.2f}× | {c['ratio_cpu']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


def _chosen(chosen: Mapping[str, Any]) -> str:
    t = chosen["training"]
    parts = [f"{t['rounds']}×{t['local_steps']} lr {t['lr']:g}"]
    names = {"lr": "personal lr", "lam": "λ", "steps": "steps ≤", "local_hidden": "local"}
    parts += [f"{names.get(k, k)} {v}" for k, v in chosen["personalization"].items()]
    if chosen["model"]["kind"] == "mlp":
        parts.append(f"hidden {chosen['model']['hidden']}")
    return ", ".join(parts)
