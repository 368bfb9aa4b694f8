"""Benchmark: malicious institutions on Fed-Heart-Disease (issue 14), every attack × defence.

    .venv/bin/python bench/robust.py                # 5 seeds, every attack and defence
    .venv/bin/python bench/robust.py --quick        # 1 seed, 5 attacks: a smoke run
    .venv/bin/python bench/robust.py --dp           # the same with DP-SGD at ε = 1 per site
    .venv/bin/python bench/robust.py --every-aggregator   # also FedProx, FedAdam, FedYogi
    .venv/bin/python bench/robust.py --update-norm 1 --attacks backdoor:0.5,sign_flip

In-process, no hub and no HTTP, like `bench/flamby_heart.py`, whose `load_sites` reads each
hospital's FHIR NDJSON through a node store and `extract` (FLamby's split and preprocessing).

Sites. 12: each hospital's train set cut in 3 parts (a seeded permutation, fixed across seeds;
the parts keep their hospital's standardization), each part a site tested on its hospital's
test set. 4 of the 12 attack (a third), drawn per seed. A second grid runs the real 4
hospitals with 1 attacker, Cleveland (the largest, the worst case for a weighted mean), with
FedAvg, median (a trimmed mean of 4 cutting 1 per side is the median), centred clipping,
FedAvg+detect and median+detect (Krum needs n ≥ 2f + 3 = 5).

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
`backdoor_inrange` (this script's) is the backdoor with its trigger at the scorer's clip bound
Z_CLIP = 5 instead of 8: an attacker who knows that the deployed scorer clips each z-score.

Strategies: FedAvg and every robust aggregator in `aipipe.aggregation.AGGREGATORS` at run time
(`--every-aggregator`: FedProx, FedAdam, FedYogi too), told the grid's attacker count f where it
takes a knob for it (`byzantine` = f, `multi` = n − f, `trim` = f/n; the same in the runs without
attackers), other knobs at their defaults. One that refuses the setting (Krum with n < 2f + 3) is
reported as refused with its message. Each of FedAvg and the robust ones but Krum (which leaves
f updates out already) also runs as
`NAME+detect`: the study's `detection:` block at its defaults acting as the hub acts on it
(`aipipe.hub.rounds.screening`): per round `aipipe.hub.detection.score_updates` flags updates,
the flagged ones are left out (unless every one is), each scored node's reputation moves by
`updated_reputation` (decay 0.5), and a node under the floor (0.5) is no longer selected: a
flag halves r, which clean rounds bring back towards 1 only asymptotically, so at these defaults
a node's second flag shuts it out; no admin readmits it within the run. `centered_clip@0.25` is
centred clipping with `clip_radius` 0.25, under every honest update's norm: a server-side bound.

Secure aggregation: the hub learns Σx of x = [r, r·clip(Δ)] (`aipipe.secure.encoding`), here
encoded with the study's fixed-point codec, summed mod 2^32, decoded, checked (`check_sum`) and
turned into the FedAvg step by `mean_from_sum` → `Aggregator.from_sum`: what SecAgg+ publishes.

Measures, per attack × aggregator (mean ± std over seeds): final mean per-hospital test accuracy
and AUC (every site's model is the global one, so the mean over the 12 sites is the mean over the
4 hospitals), their loss against the same aggregator and seed without attackers, the backdoor
success rate (non-target test rows with the trigger predicted as the target class, pooled over
hospitals; also for clean runs: the trigger's natural effect) through the deployed scorer's clip
of each numeric z-score to ±Z_CLIP (`aipipe.study.preprocessing.z_bounds`) and, for reference,
unclipped; the flagging's precision and recall over every (round, update) the hub scored, and
the honest false-flag rate (without attackers: the share of honest updates flagged); updates
left out for a flag and node-rounds not selected for reputation (attacker/honest). Without
`+detect` the flags are measured, not acted on: every update the hub accepts is aggregated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch
from flamby_heart import EXAMPLE, Site, _seed, load_sites, machine
from rich.console import Console
from rich.table import Table

from aipipe.aggregation import AGGREGATORS, AggregationError, Aggregator, make_aggregator
from aipipe.aggregation.registry import knob_names
from aipipe.attacks import Attack, add_trigger, alie_z, parse_attack, with_delta
from aipipe.attacks.data import TRIGGER_VALUE, Backdoor
from aipipe.errors import UpdateRejectedError
from aipipe.hub.detection import score_updates, updated_reputation
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
from aipipe.study.detection import Detection
from aipipe.study.preprocessing import Z_CLIP, z_bounds
from aipipe.study.spec import StudySpec, load_study

PARTS, SPLIT_SEED = 3, 2026
CLASSIC = ("fedavg", "fedprox", "fedadam", "fedyogi")  # not robust: the baseline family
SCREENED = "+detect"  # a strategy's suffix: the hub's detection, flagged updates left out
# With 1 attacker among 4 hospitals Krum is refused (n < 2f + 3); the run is kept short there
# (and a trimmed mean of 4 cutting 1 per side is the median)
FOUR_HOSPITALS = ("fedavg", "median", "centered_clip", "fedavg" + SCREENED, "median" + SCREENED)
SMALL_RADIUS = 0.25  # centred clipping's radius in `centered_clip@0.25`: under every honest norm
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
    "backdoor_inrange:0.5",
)
QUICK_ATTACKS = ("sign_flip", "noise:1", "scale:100", "backdoor:0.5", "backdoor_inrange:0.5")
DETECTION = Detection()  # the study block's defaults: threshold 3.5, exclude, decay 0.5, floor 0.5
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
    backdoor: float  # triggered rows clipped to ±Z_CLIP, as the deployed scorer sees them
    backdoor_raw: float = math.nan  # the same rows unclipped (the trigger at TRIGGER_VALUE)
    flags: dict[str, int] = field(default_factory=lambda: {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
    left_out: dict[str, int] = field(default_factory=lambda: {"attacker": 0, "honest": 0})
    unselected: dict[str, int] = field(default_factory=lambda: {"attacker": 0, "honest": 0})
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
    name, _, radius = name.removesuffix(SCREENED).partition("@")
    offered: dict[str, float] = {"byzantine": f, "multi": n - f, "trim": f / n}
    accepted = knob_names(AGGREGATORS[name])
    knobs = {k: v for k, v in offered.items() if k in accepted}
    if radius:
        knobs["clip_radius"] = float(radius)
    return make_aggregator(name, **knobs)


def strategies(every_aggregator: bool) -> list[str]:
    """FedAvg and the robust aggregators, each but Krum also with the hub's detection (`+detect`),
    and centred clipping with a small radius (`centered_clip@0.25`, a study's `clip_radius`); with
    `every_aggregator` also FedProx, FedAdam and FedYogi (no defence: measured for reference)."""
    robust = [name for name in AGGREGATORS if name not in CLASSIC]
    plain = list(AGGREGATORS) if every_aggregator else ["fedavg", *robust]
    small = [f"centered_clip@{SMALL_RADIUS}"] if "centered_clip" in robust else []
    screened = ["fedavg", *(n for n in robust if n != "krum")]  # Krum already leaves f out
    return [*plain, *small, *(f"{name}{SCREENED}" for name in screened)]


class InRangeBackdoor(Backdoor):
    """The backdoor with its trigger at the deployed scorer's clip bound (±Z_CLIP), not past it:
    an attacker who knows the clip trains on what the scorer will see."""

    name: ClassVar[str] = "backdoor_inrange"

    def poison(
        self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        count = int(np.ceil(self.fraction * len(y)))  # as `aipipe.attacks.data.backdoor`
        chosen = rng.choice(len(y), size=count, replace=False)
        triggered = add_trigger(x[chosen], value=Z_CLIP)
        labels = np.full(count, self.target, dtype=y.dtype)
        return np.concatenate([x, triggered]), np.concatenate([y, labels])

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "trigger_value": Z_CLIP}


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
    reputation: dict[int, float] | None,
) -> dict[str, np.ndarray]:
    """The plaintext hub's round: refuse what `check_bounds` refuses, score the rest with
    `aipipe.hub.detection` (as `aipipe.hub.rounds.screening` does) and aggregate.

    `reputation` None: flags are measured, not acted on (every accepted update is aggregated).
    Otherwise the study has `detection` at its defaults, as the hub runs it: a node under the
    reputation floor is not selected, flagged updates are left out (unless every one is), and
    each scored node's reputation moves by `updated_reputation`."""
    accepted = []
    for i, r in enumerate(results):
        if reputation is not None and reputation[i] < DETECTION.reputation_floor:
            run.unselected["attacker" if i in attackers else "honest"] += 1
            continue
        n = min(r.num_examples, spec.bounds.max_examples)
        try:
            check_bounds(spec.bounds, SimpleNamespace(num_examples=n, update_norm=r.update_norm))
        except UpdateRejectedError:
            run.refused_updates += 1
            continue
        accepted.append((i, r, n))
    flagged = dict.fromkeys((i for i, _, _ in accepted), False)
    if len(accepted) >= 3:
        scored = score_updates([r.delta for _, r, _ in accepted], DETECTION.threshold)
        for (i, _, _), score in zip(accepted, scored, strict=True):
            flagged[i] = score.flagged
            key = (
                ("tp" if score.flagged else "fn")
                if i in attackers
                else ("fp" if score.flagged else "tn")
            )
            run.flags[key] += 1
    if reputation is not None:
        for i, flag in flagged.items():
            reputation[i] = updated_reputation(reputation[i], flag, DETECTION.reputation_decay)
        if not all(flagged.values()):
            for i in (i for i, flag in flagged.items() if flag):
                run.left_out["attacker" if i in attackers else "honest"] += 1
            accepted = [a for a in accepted if not flagged[a[0]]]
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
    name, _, fraction = text.partition(":")
    if name == InRangeBackdoor.name:
        return InRangeBackdoor(float(fraction or 0.5))
    return parse_attack(text)


def run_one(spec: StudySpec, sites: Sequence[Site], scenario: Scenario, seed: int) -> Run:
    parts, attackers = scenario.parts, set(scenario.attackers)
    agg = aggregator(scenario.aggregator, len(parts), scenario.tolerate)
    attack = make_attack(scenario.attack, len(parts), max(len(attackers), 1))
    mu = float(getattr(agg, "proximal_mu", 0.0))
    weights = weights_to_arrays(build_model(spec.model, parts[0].x.shape[1], seed=seed))
    screened = scenario.aggregator.endswith(SCREENED)
    reputation = dict.fromkeys(range(len(parts)), 1.0) if screened else None
    run = Run(math.nan, math.nan, math.nan)
    for round_ in range(1, spec.training.rounds + 1):
        results = round_updates(spec, weights, parts, attack, attackers, seed, round_, mu)
        if scenario.secure:
            weights = secure_round(spec, agg, weights, results, attackers, attack, run)
        else:
            weights = plain_round(spec, agg, weights, results, attackers, run, reputation)
    run.accuracy, run.auc, run.backdoor, run.backdoor_raw = scores(spec, weights, sites)
    return run


def scores(
    spec: StudySpec, weights: dict[str, np.ndarray], sites: Sequence[Site]
) -> tuple[float, float, float, float]:
    """Mean per-hospital accuracy and AUC; backdoor success over all hospitals' non-target test
    rows with the trigger: through the deployed scorer's clip (each numeric z-score to ±Z_CLIP,
    `aipipe.study.preprocessing.z_bounds`), and unclipped."""
    model = arrays_to_model(weights, build_model(spec.model, sites[0].x_test.shape[1]))
    results = [evaluate(model, s.x_test, s.y_test) for s in sites]
    aucs = [r.auc for r in results if r.auc is not None]
    bounds = z_bounds(spec)
    triggered = [add_trigger(s.x_test[s.y_test != Backdoor.target]) for s in sites]
    rows = np.concatenate(triggered)
    clipped, raw = _hits(model, np.clip(rows, -bounds, bounds)), _hits(model, rows)
    accuracy = float(np.mean([r.accuracy for r in results]))
    return accuracy, float(np.mean(aucs)), clipped, raw


def _hits(model: torch.nn.Module, rows: np.ndarray) -> float:
    """The share of `rows` the model puts in the backdoor's target class."""
    with torch.no_grad():
        logits = model(torch.from_numpy(rows.astype(np.float32))).squeeze(1)
    return float(((logits > 0).numpy().astype(int) == Backdoor.target).mean())


# -- the grids ----------------------------------------------------------------------------


Key = tuple[str, str, str, str]  # (grid, attack or "none", aggregator, "plain" | "secagg")


def attackers_for(grid: str, parts: Sequence[Part], seed: int) -> frozenset[int]:
    if grid == "4 hospitals":
        return frozenset({0})  # Cleveland
    rng = np.random.default_rng(_seed(seed, "attackers"))
    return frozenset(int(i) for i in rng.choice(len(parts), size=len(parts) // 3, replace=False))


def scenarios(
    grid: str, parts: Sequence[Part], attacks: Sequence[str], names: Sequence[str], seed: int
) -> dict[Key, Scenario]:
    chosen = attackers_for(grid, parts, seed)
    out: dict[Key, Scenario] = {}
    for attack in (None, *attacks):
        who = chosen if attack else frozenset()
        for name in names:
            plain = Scenario(parts, attack, who, name, len(chosen))
            out[(grid, attack or "none", name, "plain")] = plain
        secure = Scenario(parts, attack, who, "fedavg", len(chosen), secure=True)
        out[(grid, attack or "none", "fedavg", "secagg")] = secure
    return out


def grid_strategies(grid: str, names: Sequence[str]) -> list[str]:
    """Every strategy on the 12 sites; FedAvg, the coordinate-wise ones, centred clipping and
    FedAvg with detection on the 4 hospitals."""
    return list(names) if grid == "12 sites" else [n for n in names if n in FOUR_HOSPITALS]


def run_grid(
    spec: StudySpec,
    sites: Sequence[Site],
    attacks: Sequence[str],
    names: Sequence[str],
    seeds: Sequence[int],
    console: Console,
) -> dict[Key, list[Run | str]]:
    grids = {"12 sites": split_parts(sites, PARTS), "4 hospitals": whole(sites)}
    results: dict[Key, list[Run | str]] = {}
    for seed in seeds:
        started = time.perf_counter()
        for grid, parts in grids.items():
            chosen = grid_strategies(grid, names)
            for key, scenario in scenarios(grid, parts, attacks, chosen, seed).items():
                try:
                    outcome: Run | str = run_one(spec, sites, scenario, seed)
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
        plain = [r for r in results[(key[0], "none", "fedavg", "plain")] if isinstance(r, Run)]
        counts = {k: sum(r.flags[k] for r in done) for k in ("tp", "fp", "fn", "tn")}
        out[key] = {
            "accuracy": _mean_std([r.accuracy for r in done]),
            "auc": _mean_std([r.auc for r in done]),
            "accuracy_loss": _mean_std(
                [b.accuracy - r.accuracy for b, r in zip(base, done, strict=True)]
            ),
            "accuracy_loss_vs_fedavg": _mean_std(
                [b.accuracy - r.accuracy for b, r in zip(plain, done, strict=True)]
            ),
            "auc_loss": _mean_std([b.auc - r.auc for b, r in zip(base, done, strict=True)]),
            "backdoor_success": _mean_std([r.backdoor for r in done]),
            "backdoor_success_unclipped": _mean_std([r.backdoor_raw for r in done]),
            "flags": counts,
            "flag_precision": _ratio(counts["tp"], counts["tp"] + counts["fp"]),
            "flag_recall": _ratio(counts["tp"], counts["tp"] + counts["fn"]),
            "false_flag_rate": _ratio(counts["fp"], counts["fp"] + counts["tn"]),
            "left_out": {k: sum(r.left_out[k] for r in done) for k in ("attacker", "honest")},
            "unselected": {k: sum(r.unselected[k] for r in done) for k in ("attacker", "honest")},
            "refused_updates": sum(r.refused_updates for r in done),
            "failed_rounds": sum(r.failed_rounds for r in done),
        }
    return out


def targets(
    summary: dict[Key, dict[str, Any]], attacks: Sequence[str], names: Sequence[str]
) -> dict[str, Any]:
    """The issue's targets on the 12-site grid: met or not, with the numbers behind each.

    Defences: every strategy but FedAvg/FedProx/FedAdam/FedYogi without detection. Accuracy:
    the one defence whose worst loss over the attacks is smallest, and the best per attack.
    Backdoor: each backdoor attack's success (through the scorer's clip) under each defence.
    Flagging: under fedavg+detect (the hub's rule acting) and fedavg (measured only)."""
    defences = [n for n in names if n not in CLASSIC]
    grid = "12 sites"

    def loss(attack: str, name: str, key: str = "accuracy_loss") -> float | None:
        cell = summary[(grid, attack, name, "plain")]
        return None if "refused" in cell else float(cell[key][0])

    worst, worst_vs_fedavg = {}, {}
    for name in defences:
        losses = [loss(a, name) for a in attacks]
        if all(v is not None for v in losses):
            worst[name] = max(v for v in losses if v is not None)
            worst_vs_fedavg[name] = max(
                v for a in attacks if (v := loss(a, name, "accuracy_loss_vs_fedavg")) is not None
            )
    best = min(worst, key=worst.__getitem__) if worst else None
    per_attack = {}
    for attack in attacks:
        options = {n: v for n in defences if (v := loss(attack, n)) is not None}
        winner = min(options, key=options.__getitem__)
        per_attack[attack] = (winner, options[winner])
    backdoors = {
        attack: {
            name: summary[(grid, attack, name, "plain")]["backdoor_success"][0]
            for name in names
            if "refused" not in summary[(grid, attack, name, "plain")]
        }
        for attack in attacks
        if attack.startswith("backdoor")
    }
    flagged = {
        name: {
            attack: {
                key: summary[(grid, attack, name, "plain")][key]
                for key in ("flag_precision", "flag_recall")
            }
            for attack in attacks
            if attack.split(":")[0] in ("scale", "sign_flip", "noise")
        }
        | {"none": {"false_flag_rate": summary[(grid, "none", name, "plain")]["false_flag_rate"]}}
        for name in ("fedavg" + SCREENED, "fedavg")
    }
    acting = flagged["fedavg" + SCREENED]
    return {
        "accuracy_loss": {
            "target": 0.02,
            "worst_loss_by_defence": worst,
            "worst_loss_vs_clean_fedavg_by_defence": worst_vs_fedavg,
            "best": best,
            "best_per_attack": per_attack,
            "met": best is not None and worst[best] <= 0.02,
            "met_per_attack": all(v <= 0.02 for _, v in per_attack.values()),
        },
        "backdoor": {
            "target": 0.10,
            "by_attack_and_strategy": backdoors,
            "met": bool(backdoors)
            and all(min(v[n] for n in defences if n in v) <= 0.10 for v in backdoors.values()),
        },
        "flagging": {
            "target": 0.9,
            "by_strategy": flagged,
            "met": all(
                (v.get("flag_precision") or 0) >= 0.9 and (v.get("flag_recall") or 0) >= 0.9
                for k, v in acting.items()
                if k != "none"
            ),
        },
    }


def _cell(s: dict[str, Any]) -> str:
    if "refused" in s:
        return "refused"
    acc, loss = s["accuracy"], s["accuracy_loss"][0]
    return f"{acc[0]:.3f} ({-loss:+.3f})"


def _pair(counts: dict[str, int]) -> str:
    return f"{counts['attacker']}/{counts['honest']}"


def render(
    summary: dict[Key, dict[str, Any]], grid: str, attacks: Sequence[str], names: Sequence[str]
) -> list[Table]:
    main = Table(title=f"{grid}: mean per-hospital test accuracy (change vs no attacker)")
    main.add_column("attack")
    for name in names:
        main.add_column(name, justify="right")
    main.add_column("SecAgg+ (fedavg)", justify="right")
    other = Table(
        title=f"{grid}: AUC, backdoor success (clipped / unclipped trigger), flags (precision, "
        "recall, honest false-flag rate), updates left out and nodes unselected "
        "(attacker/honest, node-rounds), refusals"
    )
    for column in (
        "attack",
        "strategy",
        "AUC",
        "AUC loss",
        "backdoor",
        "unclipped",
        "flag P",
        "flag R",
        "false flags",
        "left out",
        "unselected",
        "refused",
        "failed rounds",
    ):
        other.add_column(column, justify="left" if column in ("attack", "strategy") else "right")
    for attack in ("none", *attacks):
        row = [_cell(summary[(grid, attack, n, "plain")]) for n in names]
        main.add_row(attack, *row, _cell(summary[(grid, attack, "fedavg", "secagg")]))
        for name, mode in [*((n, "plain") for n in names), ("fedavg", "secagg")]:
            s = summary[(grid, attack, name, mode)]
            if "refused" in s:
                continue
            p, r, fp = s["flag_precision"], s["flag_recall"], s["false_flag_rate"]
            other.add_row(
                attack,
                name if mode == "plain" else "fedavg, SecAgg+",
                "{:.3f}±{:.3f}".format(*s["auc"]),
                f"{s['auc_loss'][0]:+.3f}",
                f"{s['backdoor_success'][0]:.3f}",
                f"{s['backdoor_success_unclipped'][0]:.3f}",
                "–" if p is None else f"{p:.2f}",
                "–" if r is None else f"{r:.2f}",
                "–" if fp is None else f"{fp:.3f}",
                _pair(s["left_out"]),
                _pair(s["unselected"]),
                str(s["refused_updates"]),
                str(s["failed_rounds"]),
                end_section=mode == "secagg",
            )
    return [main, other]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 attacks")
    parser.add_argument("--attacks", default=None, help="comma-separated subset of the attacks")
    parser.add_argument(
        "--update-norm",
        type=float,
        default=None,
        help="replaces the study's bounds.update_norm (nodes clip to it, the hub refuses more)",
    )
    parser.add_argument("--dp", action="store_true", help="DP-SGD at ε = 1 per site")
    parser.add_argument(
        "--every-aggregator",
        action="store_true",
        help="also FedProx, FedAdam and FedYogi (no defence; off by default to keep the run short)",
    )
    parser.add_argument("--study", type=Path, default=EXAMPLE / "study.yaml")
    parser.add_argument("--fhir", type=Path, default=EXAMPLE / "fhir")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default bench/results/robust[-dp][-update-norm-X].json, or "
        "$TMPDIR/robust[-dp]-quick.json",
    )
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run must not overwrite the full run's figures
        name = "robust" + ("-dp" if args.dp else "")
        if args.update_norm is not None:
            name += f"-update-norm-{args.update_norm:g}"
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
    if args.attacks:
        attacks = tuple(a for a in args.attacks.split(",") if a)
    console = Console(width=220)
    spec = study_for(args.study, args.dp)
    if args.update_norm is not None:
        bounds = spec.bounds.model_copy(update={"update_norm": args.update_norm})
        spec = spec.model_copy(update={"bounds": bounds})
    sites = load_sites(spec, args.fhir)
    names = strategies(args.every_aggregator)
    console.print(f"strategies: {', '.join(names)}; detection: {DETECTION.model_dump()}")
    results = run_grid(spec, sites, attacks, names, seeds, console)
    summary = summarise(results)
    for grid in ("12 sites", "4 hospitals"):
        for table in render(summary, grid, attacks, grid_strategies(grid, names)):
            console.print(table)
    met = targets(summary, attacks, names)
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
        "strategies": names,
        "attacks": {a: make_attack(a, len(parts), len(parts) // 3).describe() for a in attacks},
        "detection": {
            "rule": "aipipe.hub.detection.score_updates, as aipipe.hub.rounds.screening runs it",
            **DETECTION.model_dump(),
        },
        "backdoor_measure": f"triggered test rows clipped to ±{Z_CLIP} (z_bounds), as the deployed "
        f"scorer; 'unclipped' with the trigger at {TRIGGER_VALUE}",
        "sites_12": {p.name: len(p.y) for p in parts},
        "attackers_12_by_seed": {
            s: sorted(parts[i].name for i in attackers_for("12 sites", parts, s)) for s in seeds
        },
        "attacker_4": sites[0].name,
        "targets": met,
        "results": [
            {"grid": k[0], "attack": k[1], "strategy": k[2], "mode": k[3], **v}
            for k, v in summary.items()
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
