"""Benchmark: personalization on Fed-Heart-Disease (issue 13), every registered method.

    .venv/bin/python bench/personalization.py --seeds 5    # the full run (< 15 min, one core)
    .venv/bin/python bench/personalization.py --quick      # 1 seed, 3 rounds, 1 candidate

The data path is bench/flamby_heart.py's: each hospital's FHIR NDJSON ingested into its own
node store and extracted with `examples/heart-disease/study.yaml`, here with a
`personalization:` block (validation_fraction 0.2), so `extract` carves each site's validation
split out of its train split (FLamby's seeded split of the train rows); FLamby's test sets are
untouched. A seed changes initial weights and every training draw, never a split.

Strategies, each without DP and at ε = 1, δ = 1e-5 per site for the whole study:
- solo: each site alone, the same rounds × local steps as a federated site (σ calibrated for
  them), checkpoints after each round's steps and the same choice on validation;
- global: FedAvg of the study (method `none`): each site serves the global version with its
  best validation loss;
- every method in `aipipe.personalization.PERSONALIZERS` at run time, on the study's logistic
  model and/or an MLP with one hidden layer of 16 (`fedper` and `fenda` need a hidden layer:
  logistic's body is the identity, the study refuses them). Each personalized row is compared
  with solo and global on its own model (and, in the JSON, on either model).

The round loop mirrors the node: per round each site calls `method.train_round` with the σ the
`PrivacyEngine` plans for rounds × local steps at that site (`plan_local`), clips the shared Δ
to `bounds.update_norm`, the shared Δs are folded by `aggregator_for` (FedAvg, n capped at
`bounds.max_examples`), and each site keeps its training state. After each round each site
`personalize`s the new global version (carry kept) and serves the checkpoint with the best
validation loss. Personal parts are trained without noise and cost no ε (aipipe.personalization
base.py). The preprocessing statistics release (`privacy.statistics_epsilon`) is set to 0:
nothing here is released for hub-side CDS, so the whole ε = 1 goes to training.

Hyper-parameters (rounds, lr, steps, λ, hidden width) are chosen per strategy × privacy mode on
validation only: the candidate with the best mean (over seeds and sites) validation accuracy of
the served models, ties to the lower validation loss. Every candidate and its validation score
go to the JSON; test figures are those of the chosen candidate.

Metric (FLamby's): the mean over the 4 sites of each site's test accuracy of its served model at
the end; AUC too, with and without Switzerland (its test set has one negative).
Cost: median wall time of one site's node-side round work (train_round + personalize) of the
chosen setting, against method `none` on the same model and training, timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flamby_heart import DELTA, EPSILON, EXAMPLE, SITES, _seed, machine
from personalization_report import (
    markdown,
    render_cost,
    render_main,
    render_sites,
    site_wins,
    summarise,
    targets,
)
from pydantic import ValidationError
from rich.console import Console

from aipipe.aggregation import aggregator_for
from aipipe.models import Arrays, arrays_to_model, weights_to_arrays
from aipipe.models.training import EvalResult, TrainResult, clip_update, evaluate
from aipipe.node.home import init_node, open_store
from aipipe.node.ingest import ingest_files
from aipipe.personalization import (
    PERSONALIZERS,
    Personalizer,
    PersonalModel,
    SiteData,
    personalizer_for,
)
from aipipe.privacy.accountant import epsilon_for
from aipipe.privacy.engine import Plan, PrivacyEngine
from aipipe.study.blocks import Aggregation, ModelSpec, Privacy, Training
from aipipe.study.features import extract
from aipipe.study.personal import Personalization
from aipipe.study.spec import StudySpec, load_study

VALIDATION_FRACTION = 0.2
MLP = ModelSpec(kind="mlp", hidden=[16])

# Shared training per privacy mode: the study's DP setting (examples/heart-disease/study.yaml,
# tuned by flamby_heart.py) and, without DP, flamby_heart.py's tuned setting at fewer rounds
# (its FedAvg is flat after ~5), each beside one other lr or length. solo and global try every
# one; a personalization method takes the first (its own knobs are its candidates), so the
# baselines are tuned at least as hard as the methods they are compared with.
TRAINING: dict[bool, list[tuple[Training, float]]] = {
    False: [
        (Training(rounds=20, local_steps=10, lr=0.1, batch_size=32, optimizer="sgd"), 1.0),
        (Training(rounds=20, local_steps=10, lr=0.5, batch_size=32, optimizer="sgd"), 1.0),
    ],
    True: [
        (Training(rounds=10, local_steps=10, lr=0.5, batch_size=32, optimizer="sgd"), 0.5),
        (Training(rounds=5, local_steps=10, lr=0.5, batch_size=32, optimizer="sgd"), 0.5),
    ],
}
# Each method's own candidates: its `personalization:` block (the default block for a method
# not named here). `steps` is the most a refinement tries (it picks fewer on validation).
PERSONAL: dict[str, list[dict[str, Any]]] = {
    "none": [{}],
    "finetune": [{"steps": 20, "lr": 0.1}, {"steps": 20, "lr": 0.5}, {"steps": 50, "lr": 0.5}],
    "ditto": [{"lam": 0.001}, {"lam": 0.01}, {"lam": 0.1}, {"lam": 1.0}],
    "fedper": [{}],
    "fenda": [{"local_hidden": [8]}, {"local_hidden": [16]}],
}
# The MLP's hidden width: a candidate where it is the method's only knob.
WIDTHS: dict[str, list[list[int]]] = {"fedper": [[16], [32]]}


# -- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    name: str
    data: SiteData  # fit and validation splits, carved by `extract`
    x_test: np.ndarray
    y_test: np.ndarray


def load_sites(study: StudySpec, fhir: Path) -> list[Site]:
    """Each site's NDJSON into a fresh node store, extracted with the personalization block."""
    sites = []
    with tempfile.TemporaryDirectory(prefix="personalization-") as scratch:
        for name in SITES:
            store = open_store(init_node(Path(scratch) / name, name))
            try:
                ingest_files(store, [fhir / name])
                matrix = extract(store, study)
            finally:
                store.close()
            sites.append(Site(name, SiteData.of(matrix), matrix.x_test, matrix.y_test))
    return sites


# -- strategies and candidates ----------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """A row of the tables: a method (`none` for solo and global) on a model family."""

    label: str
    method: str
    family: str  # "logistic" (the study's model) or "mlp"
    federated: bool = True


@dataclass(frozen=True)
class Candidate:
    model: ModelSpec
    training: Training
    clip: float
    personal: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model.model_dump(),
            "training": self.training.model_dump(exclude={"proximal_mu"}),
            "clip": self.clip,
            "personalization": self.personal,
        }


def strategies(study: StudySpec) -> list[Strategy]:
    """solo and global on both families, then every registered method but `none`: on the
    study's logistic model where a study may name it with one, and on the MLP."""
    out = [
        Strategy("solo", "none", "logistic", federated=False),
        Strategy("global", "none", "logistic"),
        Strategy("solo (mlp)", "none", "mlp", federated=False),
        Strategy("global (mlp)", "none", "mlp"),
    ]
    for name in sorted(set(PERSONALIZERS) - {"none"}):
        if takes_logistic(study, name):
            out.append(Strategy(name, name, "logistic"))
        out.append(Strategy(f"{name} (mlp)", name, "mlp"))
    return out


def takes_logistic(study: StudySpec, method: str) -> bool:
    """Whether a study may name `method` with a logistic model (fedper and fenda federate
    hidden layers, which it lacks: the study is refused)."""
    strategy = Strategy(method, method, "logistic")
    try:
        spec_for(study, strategy, candidates(strategy, False, quick=True)[0], dp=False)
    except ValidationError:
        return False
    return True


def candidates(strategy: Strategy, dp: bool, quick: bool) -> list[Candidate]:
    out = [
        Candidate(model, training, clip, personal)
        for model in models(strategy)
        for training, clip in TRAINING[dp][: None if strategy.method == "none" else 1]
        for personal in PERSONAL.get(strategy.method, [{}])
    ]
    if quick:
        first = out[0]
        return [Candidate(first.model, _quick(first.training), first.clip, first.personal)]
    return out


def models(strategy: Strategy) -> list[ModelSpec]:
    if strategy.family == "logistic":
        return [ModelSpec()]
    return [ModelSpec(kind="mlp", hidden=h) for h in WIDTHS.get(strategy.method, [MLP.hidden])]


def _quick(training: Training) -> Training:
    return training.model_copy(update={"rounds": min(training.rounds, 3)})


def spec_for(study: StudySpec, strategy: Strategy, candidate: Candidate, dp: bool) -> StudySpec:
    privacy = study.privacy.model_copy(
        update={
            "mode": "dp" if dp else "none",
            "epsilon": EPSILON,
            "delta": DELTA,
            "clip": candidate.clip,
            "accountant": "prv",
            "statistics_epsilon": 0.0,
        }
    )
    block = {
        "method": strategy.method,
        "validation_fraction": VALIDATION_FRACTION,
        **candidate.personal,
    }
    spec = study.model_copy(
        update={
            "model": candidate.model,
            "training": candidate.training,
            "privacy": privacy,
            "aggregation": Aggregation(name="fedavg"),
            "personalization": block,
        }
    )
    return StudySpec.model_validate(spec.model_dump())  # what a hub would accept


# -- one run: the node's round loop, in-process ------------------------------------------------


@dataclass(frozen=True)
class Timing:
    train_wall: float
    train_cpu: float
    personal_wall: float
    personal_cpu: float


class Stopwatch:
    """Wall and CPU seconds since it was made (one thread: CPU is this work's own)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


@dataclass
class Run:
    """One strategy, candidate and seed: each site's served model on validation and test."""

    validation: list[EvalResult]
    test: list[EvalResult]
    served_round: list[int]
    sigma: dict[str, float] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    # node-side work per site and round: (train_round, personalize) × (wall, CPU) seconds
    timings: list[Timing] = field(default_factory=list)

    @property
    def val_accuracy(self) -> float:
        return float(np.mean([v.accuracy for v in self.validation]))

    @property
    def val_loss(self) -> float:
        return float(np.mean([v.loss for v in self.validation]))

    @property
    def accuracy(self) -> float:
        return float(np.mean([t.accuracy for t in self.test]))


@dataclass
class SiteState:
    """What one node keeps between rounds: its model, training state, carry and best checkpoint."""

    weights: Arrays
    state: Arrays = field(default_factory=dict)
    carry: Arrays = field(default_factory=dict)
    best: PersonalModel | None = None
    best_round: int = 0


@cache
def plan(training: Training, privacy: Privacy, rows: int) -> Plan:
    """The PrivacyEngine's plan at a site of `rows` fit rows: σ for rounds × local steps."""
    return PrivacyEngine.plan_local(training, privacy, rows)


def run(sites: Sequence[Site], spec: StudySpec, *, federated: bool, seed: int) -> Run:
    """`training.rounds` rounds of `spec`'s method at every site; solo when not `federated`."""
    method = personalizer_for(spec)
    n_features = sites[0].x_test.shape[1]
    init = weights_to_arrays(method.build(n_features, seed=seed))
    shared = method.shared(method.build(n_features))
    dp = spec.privacy.mode == "dp"
    plans = [plan(spec.training, spec.privacy, len(s.data.y_fit)) if dp else None for s in sites]
    nodes = [SiteState(weights=dict(init)) for _ in sites]
    aggregator = aggregator_for(spec.aggregation, 0.0)
    out = Run(validation=[], test=[], served_round=[])
    for round_ in range(1, spec.training.rounds + 1):
        trained: list[tuple[float, float]] = []
        if federated:
            aggregator.begin({name: nodes[0].weights[name] for name in shared})
        for i, (site, node) in enumerate(zip(sites, nodes, strict=True)):
            watch = Stopwatch()
            result = train_round(method, node, site, plans[i], _seed(seed, site.name, round_))
            if federated:  # what leaves the node: clipped to the study's bound, n capped
                result = clip_update(result, spec.bounds.update_norm)
                rows = min(result.num_examples, spec.bounds.max_examples)
                aggregator.accumulate(result.delta, rows)
            else:
                node.weights = {**node.weights, **result.weights}
            trained.append(watch.read())
        if federated:
            new = {**nodes[0].weights, **aggregator.finalize()}
            for node in nodes:
                node.weights = new
        for i, (site, node) in enumerate(zip(sites, nodes, strict=True)):
            watch = Stopwatch()
            personalize(method, node, site, round_, _seed(seed, site.name, round_, "personal"))
            out.timings.append(Timing(*trained[i], *watch.read()))
    for site, node, p in zip(sites, nodes, plans, strict=True):
        assert node.best is not None
        model = arrays_to_model(node.best.weights, method.build(n_features))
        out.validation.append(node.best.validation)
        out.test.append(evaluate(model, site.x_test, site.y_test))
        out.served_round.append(node.best_round)
        if p is not None:
            steps = spec.training.rounds * spec.training.local_steps
            out.sigma[site.name] = p.noise_multiplier
            out.epsilon[site.name] = epsilon_for(p.noise_multiplier, p.sample_rate, steps, DELTA)
    return out


def train_round(
    method: Personalizer, node: SiteState, site: Site, p: Plan | None, seed: int
) -> TrainResult:
    """The node's training step of a round: the shared part's update; the state kept."""
    model = arrays_to_model(node.weights, method.build(site.x_test.shape[1]))
    sigma = p.noise_multiplier if p is not None else None
    step = method.train_round(model, node.state, site.data, noise_multiplier=sigma, seed=seed)
    node.state = step.state
    return step.result


def personalize(method: Personalizer, node: SiteState, site: Site, round_: int, seed: int) -> None:
    """The node's personal model of the new global version; served if its validation loss is
    the best so far."""
    model = arrays_to_model(node.weights, method.build(site.x_test.shape[1]))
    personal = method.personalize(model, node.state, node.carry, site.data, seed=seed)
    node.carry = personal.carry
    if node.best is None or personal.validation.loss < node.best.validation.loss:
        node.best, node.best_round = personal, round_


# -- selection on validation, then the chosen candidate's test figures -------------------------


@dataclass
class Outcome:
    """One strategy under one privacy mode: every candidate's validation score, the chosen one's
    runs (one per seed)."""

    strategy: Strategy
    dp: bool
    chosen: Candidate
    runs: list[Run]
    scored: list[dict[str, Any]]


def select(
    sites: Sequence[Site],
    study: StudySpec,
    strategy: Strategy,
    dp: bool,
    seeds: Sequence[int],
    quick: bool,
) -> Outcome:
    """Run every candidate on every seed; keep the best mean validation accuracy (over seeds and
    sites; ties to the lower validation loss). Test results of the others are never looked at."""
    best: tuple[tuple[float, float], Candidate, list[Run]] | None = None
    scored = []
    for candidate in candidates(strategy, dp, quick):
        spec = spec_for(study, strategy, candidate, dp)
        runs = [run(sites, spec, federated=strategy.federated, seed=seed) for seed in seeds]
        accuracy = statistics.fmean(r.val_accuracy for r in runs)
        loss = statistics.fmean(r.val_loss for r in runs)
        scored.append({**candidate.describe(), "val_accuracy": accuracy, "val_loss": loss})
        key = (accuracy, -loss)
        if best is None or key > best[0]:
            best = (key, candidate, runs)
    assert best is not None
    return Outcome(strategy, dp, best[1], best[2], scored)


def time_cost(
    sites: Sequence[Site], study: StudySpec, outcome: Outcome, repeats: int
) -> dict[str, Any]:
    """Node-side work per site-round of the chosen setting against method `none` on the same
    model and training, the two alternated in this process (same load): medians of wall and
    CPU seconds of train_round + personalize, and of each part."""
    baseline = Strategy("none", "none", outcome.strategy.family)
    none = Candidate(outcome.chosen.model, outcome.chosen.training, outcome.chosen.clip, {})
    pairs = ((outcome.strategy, outcome.chosen), (baseline, none))
    timings: dict[str, list[Timing]] = {"method": [], "none": []}
    for repeat in range(repeats):
        for key, (strategy, candidate) in zip(timings, pairs, strict=True):
            spec = spec_for(study, strategy, candidate, outcome.dp)
            timings[key] += run(sites, spec, federated=True, seed=repeat).timings
    out: dict[str, Any] = {"site_rounds": len(timings["method"])}
    for key, ts in timings.items():
        out[key] = {
            "wall_s": statistics.median(t.train_wall + t.personal_wall for t in ts),
            "cpu_s": statistics.median(t.train_cpu + t.personal_cpu for t in ts),
            "train_round_wall_s": statistics.median(t.train_wall for t in ts),
            "personalize_wall_s": statistics.median(t.personal_wall for t in ts),
        }
    out["ratio"] = out["method"]["wall_s"] / out["none"]["wall_s"]
    out["ratio_cpu"] = out["method"]["cpu_s"] / out["none"]["cpu_s"]
    return out


# -- JSON and main ----------------------------------------------------------------------------


def _eval(result: EvalResult) -> dict[str, Any]:
    return {"n": result.n, "accuracy": result.accuracy, "auc": result.auc, "loss": result.loss}


def seed_record(seed: int, r: Run) -> dict[str, Any]:
    return {
        "seed": seed,
        "mean_accuracy": r.accuracy,
        "val_accuracy": r.val_accuracy,
        "sites": {
            name: {"validation": _eval(v), "test": _eval(t), "served_round": k}
            for name, v, t, k in zip(SITES, r.validation, r.test, r.served_round, strict=True)
        },
        "sigma": r.sigma,
        "epsilon": r.epsilon,
    }


def data_record(sites: Sequence[Site]) -> dict[str, Any]:
    return {
        s.name: {
            "fit": len(s.data.y_fit),
            "validation": len(s.data.y_val),
            "test": len(s.y_test),
            "fit_positive_rate": float(s.data.y_fit.mean()),
            "validation_positive_rate": float(s.data.y_val.mean()),
            "test_positive_rate": float(s.y_test.mean()),
        }
        for s in sites
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--study", type=Path, default=EXAMPLE / "study.yaml")
    parser.add_argument("--fhir", type=Path, default=EXAMPLE / "fhir")
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 rounds, 1 candidate")
    parser.add_argument("--timing-repeats", type=int, default=2, help="runs per cost pair (2)")
    parser.add_argument(
        "--markdown", type=Path, help="print a results file's tables as markdown, run nothing"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default bench/results/personalization.json, or $TMPDIR/personalization-quick.json",
    )
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run must not overwrite the full run's figures
        quick = Path(tempfile.gettempdir()) / "personalization-quick.json"
        args.out = quick if args.quick else Path("bench/results/personalization.json")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG notice, PRV's overflow warnings
    np.seterr(all="ignore")
    info = machine(threads=1)
    console = Console(width=200)
    seeds = list(range(1 if args.quick else args.seeds))
    study = load_study(args.study).model_copy(
        update={"personalization": Personalization(validation_fraction=VALIDATION_FRACTION)}
    )
    sites = load_sites(study, args.fhir)
    console.print(
        "sites (fit/validation/test): "
        + ", ".join(
            f"{s.name} {len(s.data.y_fit)}/{len(s.data.y_val)}/{len(s.y_test)}" for s in sites
        )
        + f"; methods registered: {', '.join(sorted(PERSONALIZERS))}"
    )
    outcomes: dict[tuple[str, bool], Outcome] = {}
    costs: dict[tuple[str, bool], dict[str, Any]] = {}
    seconds: dict[tuple[str, bool], dict[str, float]] = {}
    for dp in (False, True):
        for strategy in strategies(study):
            began, cpu_began = time.perf_counter(), time.process_time()
            outcome = select(sites, study, strategy, dp, seeds, args.quick)
            outcomes[(strategy.label, dp)] = outcome
            if strategy.method != "none":
                repeats = 1 if args.quick else args.timing_repeats
                costs[(strategy.label, dp)] = time_cost(sites, study, outcome, repeats)
            seconds[(strategy.label, dp)] = {
                "wall": time.perf_counter() - began,
                "cpu": time.process_time() - cpu_began,
            }
            console.print(
                f"  {strategy.label} {'ε=1' if dp else 'no DP'}: {len(outcome.scored)} "
                f"candidates, {seconds[(strategy.label, dp)]['cpu']:.1f} s CPU",
                highlight=False,
            )
    records = {
        key: [seed_record(seed, r) for seed, r in zip(seeds, o.runs, strict=True)]
        for key, o in outcomes.items()
    }
    summaries = {key: summarise(seeds_) for key, seeds_ in records.items()}
    wins = site_wins(summaries)
    met = targets(summaries, wins, costs)
    console.print(render_main(summaries))
    console.print(render_sites(summaries, wins))
    console.print(render_cost(costs))
    for name, t in met.items():
        console.print(f"target {name}: {json.dumps(t)}", highlight=False)
    runtime, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    console.print(f"runtime {runtime:.0f} s wall, {cpu:.0f} s CPU")
    report = {
        "benchmark": "personalization",
        "command": shlex.join([".venv/bin/python", "bench/personalization.py", *sys.argv[1:]]),
        "runtime_s": runtime,
        "cpu_s": cpu,
        "machine": {**info, "loadavg_at_end": os.getloadavg()},
        "seeds": seeds,
        "privacy": {"epsilon_per_site": EPSILON, "delta": DELTA, "accountant": "prv"},
        "validation_fraction": VALIDATION_FRACTION,
        "candidate_grid": {
            "training_and_clip": {
                "dp" if dp else "none": [
                    {**t.model_dump(exclude={"proximal_mu"}), "clip": c} for t, c in grid
                ]
                for dp, grid in TRAINING.items()
            },
            "personalization": PERSONAL,
            "mlp_hidden": {"default": MLP.hidden, **WIDTHS},
            "selection": "best mean validation accuracy over seeds and sites, ties to the "
            "lower validation loss; solo and global try every training setting, a method the "
            "first of its mode with each of its own candidates",
        },
        "methods_registered": sorted(PERSONALIZERS),
        "data": data_record(sites),
        "targets": met,
        "results": [
            {
                "strategy": label,
                "method": o.strategy.method,
                "family": o.strategy.family,
                "federated": o.strategy.federated,
                "dp": dp,
                "chosen": o.chosen.describe(),
                "candidates_on_validation": o.scored,
                "summary": summaries[(label, dp)],
                "cost": costs.get((label, dp)),
                "seconds": seconds[(label, dp)],
                "seeds": records[(label, dp)],
            }
            for (label, dp), o in outcomes.items()
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
