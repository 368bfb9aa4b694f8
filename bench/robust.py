"""Benchmark: malicious institutions on Fed-Heart-Disease (issue 14), every attack × aggregator.

    .venv/bin/python bench/robust.py                # 5 seeds, every attack and aggregator
    .venv/bin/python bench/robust.py --quick        # 1 seed, 3 attacks: a smoke run (~20 s of CPU)
    .venv/bin/python bench/robust.py --dp           # the same with DP-SGD at ε = 1 per site

In-process, no hub and no HTTP, like `bench/flamby_heart.py`, whose `load_sites` reads each
hospital's FHIR NDJSON through a node store and `extract` (FLamby's split and preprocessing).

Sites. 12: each hospital's train set cut in 3 parts (a seeded permutation, fixed across seeds;
the parts keep their hospital's standardization), each part a site tested on its hospital's
test set. 4 of the 12 attack (a third), drawn per seed. A second grid runs the real 4
hospitals with 1 attacker, Cleveland (the largest, the worst case for a weighted mean).

Training is the study's (examples/heart-disease/study.yaml: 10 rounds of 10 SGD steps, batch 32,
lr 0.5) without DP (`--dp`: the study's DP-SGD, ε = 1, clip 0.5). Each node clips its update to
`bounds.update_norm` (10) and weighs min(n, max_examples), as `aipipe.node.worker` does; the hub
refuses an update longer than the bound (`aipipe.hub.updates.check_bounds`).

Attacks (`aipipe.attacks`, the same code the hidden `node start --attack` runs): attackers
collude, so ALIE and IPM see the honest updates of all the attackers (never the others').
ALIE's z is Baruch et al.'s for (n, f). `scale_unclipped` skips the node's own clip: the plain
hub refuses it (the attacker drops out); under SecAgg+ the attacker puts k·Δ clamped to the
codec's per-coordinate range ±max(1, update_norm) in its masked input (the hub cannot see one
input; `check_sum` bounds only the sum), the strongest input a protocol-following node can mask.

Aggregators: every name in `aipipe.aggregation.AGGREGATORS` at run time, told the grid's
attacker count f where it takes a knob for it (`byzantine` = f, `multi` = n − f, `trim` = f/n;
the same in the runs without attackers), other knobs at their defaults. One that refuses the
setting (Krum with n < 2f + 3) is reported as refused with its message.

Secure aggregation: the hub learns Σx of x = [r, r·clip(Δ)] (`aipipe.secure.encoding`), here
encoded with the study's fixed-point codec, summed mod 2^32, decoded, checked (`check_sum`) and
turned into the FedAvg step by `mean_from_sum` → `Aggregator.from_sum`: what SecAgg+ publishes.

Measures, per attack × aggregator (mean ± std over seeds): final mean per-hospital test accuracy
and AUC (every site's model is the global one, so the mean over the 12 sites is the mean over the
4 hospitals), their loss against the same aggregator and seed without attackers, the backdoor
success rate (non-target test rows with the trigger predicted as the target class, pooled over
hospitals; also for clean runs: the trigger's natural effect), and the flagging's precision and
recall over every (round, update) the hub received. Flags: `aipipe.hub.detection` when present,
else a robust z-score: d_i = ‖Δ_i − coordinate-wise median‖, z_i = 0.6745·(d_i − med d)/MAD(d),
flagged when z_i > 3.5 (Iglewicz and Hoaglin's modified z-score). Flags are measured, not acted
on: every update the hub accepts is aggregated.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flamby_heart import EXAMPLE, Site, _seed, load_sites, machine
from rich.console import Console
from rich.table import Table

from aipipe.aggregation import AGGREGATORS, AggregationError, Aggregator, make_aggregator
from aipipe.aggregation.registry import knob_names
from aipipe.attacks import Attack, add_trigger, alie_z, parse_attack, with_delta
from aipipe.attacks.data import Backdoor
from aipipe.errors import UpdateRejectedError
from aipipe.hub.updates import check_bounds
from aipipe.models import arrays_to_model, build_model, weights_to_arrays
from aipipe.models.training import TrainResult, clip_update, evaluate, train_local
from aipipe.secure.encoding import (
    UpdateLayout,
    check_sum,
    contribution,
    fixed_point_codec,
    mean_from_sum,
    value_range,
)
from aipipe.secure.errors import SecureAggregationError
from aipipe.study.spec import StudySpec, load_study

PARTS, SPLIT_SEED = 3, 2026
CLASSIC = ("fedavg", "fedprox", "fedadam", "fedyogi")  # not robust: the baseline family
ATTACKS = (
    "sign_flip",
    "scale:10",
    "scale:100",
    "scale_unclipped:100",
    "noise:1",
    "label_flip",
    "alie",
    "ipm:0.5",
    "backdoor:0.5",
)
QUICK_ATTACKS = ("sign_flip", "scale:100", "backdoor:0.5")
Z_THRESHOLD = 3.5
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Part:
    """One site: rows of one hospital's train set; tested on that hospital's test set."""

    name: str
    hospital: int
    x: np.ndarray
    y: np.ndarray


@dataclass
class Run:
    """One federation run: final per-hospital results and what the hub saw."""

    accuracy: float
    auc: float
    backdoor: float
    flags: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
    refused_updates: int = 0
    failed_rounds: int = 0


# -- sites ------------------------------------------------------------------------------------


def split_parts(sites: Sequence[Site], parts: int) -> list[Part]:
    """Each hospital's train rows in `parts` pieces: one seeded permutation, fixed for all seeds."""
    out = []
    for index, site in enumerate(sites):
        order = np.random.default_rng(SPLIT_SEED + index).permutation(len(site.y_train))
        for k, rows in enumerate(np.array_split(order, parts)):
            out.append(Part(f"{site.name}-{k + 1}", index, site.x_train[rows], site.y_train[rows]))
    return out


def whole(sites: Sequence[Site]) -> list[Part]:
    return [Part(s.name, i, s.x_train, s.y_train) for i, s in enumerate(sites)]


# -- aggregators and detection --------------------------------------------------------------


def aggregator(name: str, n: int, f: int) -> Aggregator:
    """The registered aggregator, told the attackers' count where it takes a knob for it:
    `byzantine` = f and `multi` = n − f (Blanchard et al.'s multi-Krum), `trim` = f/n per side
    (the share a trimmed mean must cut to drop every attacker); every other knob at its default.
    """
    offered = {"byzantine": f, "multi": n - f, "trim": f / n}
    accepted = knob_names(AGGREGATORS[name])
    return make_aggregator(name, **{k: v for k, v in offered.items() if k in accepted})


def _detector() -> tuple[str, Callable[[list[np.ndarray]], list[bool]]]:
    """`aipipe.hub.detection.score_updates` (issue 14's hub flagging) when the module exists,
    at the study's default threshold; else this script's robust z-score of distance alone."""
    if importlib.util.find_spec("aipipe.hub.detection") is not None:
        module = importlib.import_module("aipipe.hub.detection")
        score = getattr(module, "score_updates", None)
        if callable(score):
            return "aipipe.hub.detection.score_updates (threshold 3.5)", lambda vectors: [
                s.flagged for s in score(vectors, Z_THRESHOLD)
            ]
    return "median/MAD robust z-score of distance (bench)", robust_flags


def robust_flags(updates: list[np.ndarray]) -> list[bool]:
    """d_i = ‖u_i − median‖; flagged when 0.6745·(d_i − med d)/MAD(d) > 3.5."""
    stack = np.stack(updates)
    distance = np.linalg.norm(stack - np.median(stack, axis=0), axis=1)
    centre = float(np.median(distance))
    mad = float(np.median(np.abs(distance - centre)))
    z = 0.6745 * (distance - centre) / max(mad, 1e-12)
    return [bool(v > Z_THRESHOLD) for v in z]


def _flat(delta: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([delta[k].astype(np.float64).ravel() for k in sorted(delta)])


# -- one round's updates ----------------------------------------------------------------------


def _train(
    spec: StudySpec,
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    mu: float,
) -> TrainResult:
    model = arrays_to_model(weights, build_model(spec.model, x.shape[1]))
    return train_local(
        model,
        x,
        y,
        training=spec.training,
        privacy=spec.privacy,
        noise_multiplier=None,
        global_weights=weights,
        proximal_mu=mu,
        seed=seed,
    )


def round_updates(
    spec: StudySpec,
    weights: dict[str, np.ndarray],
    parts: Sequence[Part],
    attack: Attack | None,
    attackers: set[int],
    seed: int,
    round_: int,
    mu: float,
) -> list[TrainResult]:
    """Every site's update as it leaves the node: trained (on poisoned rows for a data-level
    attacker), corrupted (update-level attackers, colluding), clipped unless the attack skips it."""
    results = []
    for i, part in enumerate(parts):
        rng = np.random.default_rng(_seed(seed, part.name, round_, "attack"))
        x, y = part.x, part.y
        if attack is not None and i in attackers:
            x, y = attack.poison(x, y, rng)
        results.append(_train(spec, weights, x, y, _seed(seed, part.name, round_), mu))
    if attack is not None and attack.level == "update":
        benign = [results[i].delta for i in sorted(attackers)]
        for i in sorted(attackers):
            rng = np.random.default_rng(_seed(seed, parts[i].name, round_, "corrupt"))
            results[i] = with_delta(results[i], attack.corrupt(results[i].delta, benign, rng))
    bound = spec.bounds.update_norm
    skip = attack is not None and attack.skips_clip
    return [r if skip and i in attackers else clip_update(r, bound) for i, r in enumerate(results)]


# -- the hub: plaintext with any aggregator, or SecAgg+'s sum -------------------------------


def plain_round(
    spec: StudySpec,
    agg: Aggregator,
    weights: dict[str, np.ndarray],
    results: list[TrainResult],
    attackers: set[int],
    run: Run,
    detect: Callable[[list[np.ndarray]], list[bool]],
) -> dict[str, np.ndarray]:
    """Refuse what `check_bounds` refuses, flag the rest, aggregate every accepted update."""
    accepted = []
    for i, r in enumerate(results):
        n = min(r.num_examples, spec.bounds.max_examples)
        try:
            check_bounds(spec.bounds, SimpleNamespace(num_examples=n, update_norm=r.update_norm))
        except UpdateRejectedError:
            run.refused_updates += 1
            continue
        accepted.append((i, r, n))
    if len(accepted) >= 3:
        for (i, _, _), flag in zip(
            accepted, detect([_flat(r.delta) for _, r, _ in accepted]), strict=True
        ):
            key = ("tp" if flag else "fn") if i in attackers else ("fp" if flag else "tn")
            run.flags[key] += 1
    agg.begin(weights)
    for _, r, n in accepted:
        agg.accumulate(r.delta, n)
    return agg.finalize()


def secure_round(
    spec: StudySpec,
    agg: Aggregator,
    weights: dict[str, np.ndarray],
    results: list[TrainResult],
    attackers: set[int],
    attack: Attack | None,
    run: Run,
) -> dict[str, np.ndarray]:
    """Σx as SecAgg+ unmasks it: fixed-point words summed mod 2^32, decoded and checked."""
    layout = UpdateLayout.of(weights)
    bound, cap = spec.bounds.update_norm, spec.bounds.max_examples
    codec = fixed_point_codec(bound, len(results), 32)
    total = np.zeros(layout.size, dtype=codec.dtype)
    for i, r in enumerate(results):
        if attack is not None and attack.skips_clip and i in attackers:
            x = contribution(
                r.delta, r.num_examples, layout=layout, update_clip=math.inf, max_examples=cap
            )
            x = np.clip(x, -value_range(bound), value_range(bound))  # the codec's range, no L2
        else:
            x = contribution(
                r.delta, r.num_examples, layout=layout, update_clip=bound, max_examples=cap
            )
        total += codec.encode(x)  # uint32 arithmetic wraps: addition mod 2^32
    summed = codec.decode_sum(total, len(results))
    try:
        check_sum(summed, len(results), bound, SUM_TOLERANCE)
    except SecureAggregationError:
        run.failed_rounds += 1  # no model is published: the round fails, the model stays
        return weights
    weighted, examples = mean_from_sum(summed, layout=layout, max_examples=cap)
    return agg.from_sum(weights, weighted, examples)


# -- one federation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """What one run varies: the sites, who attacks and how, the aggregator, plaintext or not."""

    parts: Sequence[Part]
    attack: str | None
    attackers: frozenset[int]
    aggregator: str
    tolerate: int  # attackers the aggregator is set up for, in clean runs too
    secure: bool = False


def make_attack(text: str | None, n: int, f: int) -> Attack | None:
    """The attack of a grid row; ALIE gets Baruch et al.'s z for (n, f)."""
    if text is None:
        return None
    if text == "alie":
        return parse_attack(f"alie:{alie_z(n, f)}")
    return parse_attack(text)


def run_one(
    spec: StudySpec,
    sites: Sequence[Site],
    scenario: Scenario,
    seed: int,
    detect: Callable[[list[np.ndarray]], list[bool]],
) -> Run:
    parts, attackers = scenario.parts, set(scenario.attackers)
    agg = aggregator(scenario.aggregator, len(parts), scenario.tolerate)
    attack = make_attack(scenario.attack, len(parts), max(len(attackers), 1))
    mu = float(getattr(agg, "proximal_mu", 0.0))
    weights = weights_to_arrays(build_model(spec.model, parts[0].x.shape[1], seed=seed))
    run = Run(math.nan, math.nan, math.nan)
    for round_ in range(1, spec.training.rounds + 1):
        results = round_updates(spec, weights, parts, attack, attackers, seed, round_, mu)
        if scenario.secure:
            weights = secure_round(spec, agg, weights, results, attackers, attack, run)
        else:
            weights = plain_round(spec, agg, weights, results, attackers, run, detect)
    run.accuracy, run.auc, run.backdoor = scores(spec, weights, sites)
    return run


def scores(
    spec: StudySpec, weights: dict[str, np.ndarray], sites: Sequence[Site]
) -> tuple[float, float, float]:
    """Mean per-hospital accuracy and AUC; backdoor success over all hospitals' test rows."""
    model = arrays_to_model(weights, build_model(spec.model, sites[0].x_test.shape[1]))
    results = [evaluate(model, s.x_test, s.y_test) for s in sites]
    aucs = [r.auc for r in results if r.auc is not None]
    hit = total = 0
    for s in sites:
        rows = s.x_test[s.y_test != Backdoor.target]
        with torch.no_grad():
            logits = model(torch.from_numpy(add_trigger(rows).astype(np.float32))).squeeze(1)
        predicted = (logits > 0).numpy().astype(int)
        hit, total = hit + int((predicted == Backdoor.target).sum()), total + len(rows)
    accuracy = float(np.mean([r.accuracy for r in results]))
    return accuracy, float(np.mean(aucs)), hit / total


# -- the grids ----------------------------------------------------------------------------


Key = tuple[str, str, str, str]  # (grid, attack or "none", aggregator, "plain" | "secagg")


def attackers_for(grid: str, parts: Sequence[Part], seed: int) -> frozenset[int]:
    if grid == "4 hospitals":
        return frozenset({0})  # Cleveland
    rng = np.random.default_rng(_seed(seed, "attackers"))
    return frozenset(int(i) for i in rng.choice(len(parts), size=len(parts) // 3, replace=False))


def scenarios(
    grid: str, parts: Sequence[Part], attacks: Sequence[str], seed: int
) -> dict[Key, Scenario]:
    chosen = attackers_for(grid, parts, seed)
    out: dict[Key, Scenario] = {}
    for attack in (None, *attacks):
        who = chosen if attack else frozenset()
        for name in AGGREGATORS:
            plain = Scenario(parts, attack, who, name, len(chosen))
            out[(grid, attack or "none", name, "plain")] = plain
        secure = Scenario(parts, attack, who, "fedavg", len(chosen), secure=True)
        out[(grid, attack or "none", "fedavg", "secagg")] = secure
    return out


def run_grid(
    spec: StudySpec,
    sites: Sequence[Site],
    attacks: Sequence[str],
    seeds: Sequence[int],
    detect: Callable[[list[np.ndarray]], list[bool]],
    console: Console,
) -> dict[Key, list[Run | str]]:
    grids = {"12 sites": split_parts(sites, PARTS), "4 hospitals": whole(sites)}
    results: dict[Key, list[Run | str]] = {}
    for seed in seeds:
        started = time.perf_counter()
        for grid, parts in grids.items():
            for key, scenario in scenarios(grid, parts, attacks, seed).items():
                try:
                    outcome: Run | str = run_one(spec, sites, scenario, seed, detect)
                except AggregationError as exc:
                    outcome = f"refused: {exc}"
                results.setdefault(key, []).append(outcome)
        console.print(f"  seed {seed}: {time.perf_counter() - started:.1f} s")
    return results


# -- summaries, tables, JSON ----------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarise(results: dict[Key, list[Run | str]]) -> dict[Key, dict[str, Any]]:
    out: dict[Key, dict[str, Any]] = {}
    for key, runs in results.items():
        refused = next((r for r in runs if isinstance(r, str)), None)
        if refused is not None:
            out[key] = {"refused": refused}
            continue
        clean = results.get((key[0], "none", key[2], key[3]), [])
        done = [r for r in runs if isinstance(r, Run)]
        base = [r for r in clean if isinstance(r, Run)]
        counts = {k: sum(r.flags[k] for r in done) for k in ("tp", "fp", "fn", "tn")}
        out[key] = {
            "accuracy": _mean_std([r.accuracy for r in done]),
            "auc": _mean_std([r.auc for r in done]),
            "accuracy_loss": _mean_std(
                [b.accuracy - r.accuracy for b, r in zip(base, done, strict=True)]
            ),
            "auc_loss": _mean_std([b.auc - r.auc for b, r in zip(base, done, strict=True)]),
            "backdoor_success": _mean_std([r.backdoor for r in done]),
            "flags": counts,
            "flag_precision": _ratio(counts["tp"], counts["tp"] + counts["fp"]),
            "flag_recall": _ratio(counts["tp"], counts["tp"] + counts["fn"]),
            "refused_updates": sum(r.refused_updates for r in done),
            "failed_rounds": sum(r.failed_rounds for r in done),
        }
    return out


def targets(summary: dict[Key, dict[str, Any]], attacks: Sequence[str]) -> dict[str, Any]:
    """The issue's targets on the 12-site grid: met or not, with the numbers behind each."""
    robust = [a for a in AGGREGATORS if a not in CLASSIC]
    worst = {}
    for name in robust:
        cells = [summary[("12 sites", a, name, "plain")] for a in attacks]
        losses = [c["accuracy_loss"][0] for c in cells if "refused" not in c]
        if len(losses) == len(attacks):
            worst[name] = max(losses)
    best = min(worst, key=worst.__getitem__) if worst else None
    backdoor = [a for a in attacks if a.startswith("backdoor")]
    bd = (
        {
            name: summary[("12 sites", backdoor[0], name, "plain")].get("backdoor_success", [None])[
                0
            ]
            for name in AGGREGATORS
        }
        if backdoor
        else {}
    )
    flagged = {
        a: {
            "precision": summary[("12 sites", a, "fedavg", "plain")]["flag_precision"],
            "recall": summary[("12 sites", a, "fedavg", "plain")]["flag_recall"],
        }
        for a in attacks
        if a.split(":")[0] in ("scale", "sign_flip", "noise")
    }
    return {
        "accuracy_loss": {
            "target": 0.02,
            "worst_loss_by_robust_aggregator": worst,
            "best": best,
            "met": best is not None and worst[best] <= 0.02,
        },
        "backdoor": {
            "target": 0.10,
            "by_aggregator": bd,
            "met": best is not None and bd.get(best) is not None and bd[best] <= 0.10,
        },
        "flagging_under_fedavg": {
            "target": 0.9,
            "by_attack": flagged,
            "met": bool(flagged)
            and all(
                (v["precision"] or 0) >= 0.9 and (v["recall"] or 0) >= 0.9 for v in flagged.values()
            ),
        },
    }


def _cell(s: dict[str, Any]) -> str:
    if "refused" in s:
        return "refused"
    acc, loss = s["accuracy"], s["accuracy_loss"][0]
    return f"{acc[0]:.3f}±{acc[1]:.3f} ({-loss:+.3f})"


def render(summary: dict[Key, dict[str, Any]], grid: str, attacks: Sequence[str]) -> list[Table]:
    names = list(AGGREGATORS)
    main = Table(title=f"{grid}: mean per-hospital test accuracy ± std (change vs no attacker)")
    main.add_column("attack")
    for name in names:
        main.add_column(name, justify="right")
    main.add_column("SecAgg+ (fedavg)", justify="right")
    other = Table(title=f"{grid}: AUC loss, backdoor success, flags (precision/recall), refusals")
    for column in (
        "attack",
        "aggregator",
        "AUC",
        "AUC loss",
        "backdoor",
        "flag P",
        "flag R",
        "refused",
        "failed rounds",
    ):
        other.add_column(column, justify="left" if column in ("attack", "aggregator") else "right")
    for attack in ("none", *attacks):
        row = [_cell(summary[(grid, attack, n, "plain")]) for n in names]
        main.add_row(attack, *row, _cell(summary[(grid, attack, "fedavg", "secagg")]))
        for name, mode in [*((n, "plain") for n in names), ("fedavg", "secagg")]:
            s = summary[(grid, attack, name, mode)]
            if "refused" in s:
                continue
            p, r = s["flag_precision"], s["flag_recall"]
            other.add_row(
                attack,
                name if mode == "plain" else "fedavg, SecAgg+",
                "{:.3f}±{:.3f}".format(*s["auc"]),
                f"{s['auc_loss'][0]:+.3f}",
                f"{s['backdoor_success'][0]:.3f}",
                "–" if p is None else f"{p:.2f}",
                "–" if r is None else f"{r:.2f}",
                str(s["refused_updates"]),
                str(s["failed_rounds"]),
                end_section=mode == "secagg",
            )
    return [main, other]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 attacks")
    parser.add_argument("--dp", action="store_true", help="DP-SGD at ε = 1 per site")
    parser.add_argument("--study", type=Path, default=EXAMPLE / "study.yaml")
    parser.add_argument("--fhir", type=Path, default=EXAMPLE / "fhir")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default bench/results/robust[-dp].json, or $TMPDIR/robust[-dp]-quick.json",
    )
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run must not overwrite the full run's figures
        name = "robust" + ("-dp" if args.dp else "")
        quick = Path(tempfile.gettempdir()) / f"{name}-quick.json"
        args.out = quick if args.quick else Path(f"bench/results/{name}.json")
    return args


def study_for(path: Path, dp: bool) -> StudySpec:
    """The study's training; privacy `none` unless --dp (then its own DP-SGD at ε = 1)."""
    study = load_study(path)
    if dp:
        return study.model_copy(
            update={"privacy": study.privacy.model_copy(update={"epsilon": 1.0})}
        )
    return study.model_copy(update={"privacy": study.privacy.model_copy(update={"mode": "none"})})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG notice under --dp
    info = machine(threads=1)
    seeds = list(range(1 if args.quick else args.seeds))
    attacks = QUICK_ATTACKS if args.quick else ATTACKS
    console = Console(width=220)
    spec = study_for(args.study, args.dp)
    sites = load_sites(spec, args.fhir)
    detector, detect = _detector()
    console.print(f"aggregators: {', '.join(AGGREGATORS)}; detection: {detector}")
    results = run_grid(spec, sites, attacks, seeds, detect, console)
    summary = summarise(results)
    for grid in ("12 sites", "4 hospitals"):
        for table in render(summary, grid, attacks):
            console.print(table)
    met = targets(summary, attacks)
    console.print_json(json.dumps(met))
    runtime = time.perf_counter() - started
    console.print(f"runtime {runtime:.0f} s, CPU {time.process_time():.0f} s")
    parts = split_parts(sites, PARTS)
    report = {
        "benchmark": "robust",
        "command": shlex.join([".venv/bin/python", "bench/robust.py", *sys.argv[1:]]),
        "runtime_s": runtime,
        "cpu_s": time.process_time(),  # the load-independent cost (one thread)
        "machine": {**info, "loadavg_at_end": os.getloadavg()},
        "seeds": seeds,
        "dp": args.dp,
        "training": spec.training.model_dump(),
        "bounds": spec.bounds.model_dump(),
        "aggregators": list(AGGREGATORS),
        "attacks": {a: make_attack(a, len(parts), len(parts) // 3).describe() for a in attacks},
        "detection": {"method": detector, "z_threshold": Z_THRESHOLD},
        "sites_12": {p.name: len(p.y) for p in parts},
        "attackers_12_by_seed": {
            s: sorted(parts[i].name for i in attackers_for("12 sites", parts, s)) for s in seeds
        },
        "attacker_4": sites[0].name,
        "targets": met,
        "results": [
            {"grid": k[0], "attack": k[1], "aggregator": k[2], "mode": k[3], **v}
            for k, v in summary.items()
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
