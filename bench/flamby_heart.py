"""Benchmark: FLamby's Fed-Heart-Disease protocol run with aipipe's own training and aggregation.

    .venv/bin/python bench/flamby_heart.py --seeds 5     # the full run (≤ 15 min on 2 cores)
    .venv/bin/python bench/flamby_heart.py --quick       # 1 seed, short runs: a smoke test

No hub and no HTTP, but the code a deployment runs: each hospital's FHIR NDJSON
(`examples/heart-disease/fhir/<site>`) is ingested into its own temporary node store
(`init_node`, `open_store`, `ingest_files`) and turned into matrices by
`aipipe.study.features.extract` with `examples/heart-disease/study.yaml`, which reproduces
FLamby's preprocessing and its 199/104, 172/89, 30/16, 85/45 split. Training is
`aipipe.models.training.train_local` / `evaluate` (DP-SGD when `privacy.mode: dp`, σ calibrated
by `train_local` so that rounds × local steps stay within ε = 1, δ = 1e-5 at each site, PRV
accountant), aggregation is `aipipe.aggregation.aggregator_for` with `begin/accumulate/finalize`.
The two privacy modes run in two processes (`--jobs 2`, the default); nothing else is shared.

Strategies (a seed changes the initial weights and every training draw, never the split):
- pooled: one model on the union of the 4 train sets, standardized with the POOLED train mean
  and std (FLamby's `pooled=True`), and tested on each site's test set standardized with the
  same pooled statistics. `pooled, FLamby eval` is the same model tested as FLamby's benchmark
  does, on the per-site standardized test sets (FLamby's per-client test loaders), i.e. with
  statistics other than those it was trained with. `pooled, site-z` trains on the concatenation
  of the per-site standardized sets: the centralized counterpart of what the federated
  strategies see (run without DP only, as the reference for federated runs).
- local: each site alone, tested on its own test set; a second table gives each local model's
  mean over the 4 test sets, which is what FLamby reports as "Local i".
- FedAvg, FedProx, FedAdam, FedYogi, each without and with DP.

Metric (FLamby's): the mean over the 4 sites of each site's test accuracy at threshold 0.5, at
the last round (never the best round). AUC is averaged over the sites whose test set holds
both classes; Switzerland's test set has a single negative (15 of 16 positive), so its AUC is
the rank of one row: shown with and without it. ± is the sample std over seeds. `r→95%` is the
first round whose mean per-client accuracy reaches 95% of a reference (our `flamby` pooled
accuracy without DP, or the `pooled, site-z` one): the median over the seeds that reach it,
and how many do.

Two settings: `flamby` (the study's constants: batch 4, Adam lr 1e-3, 100 local steps,
15 rounds; FedProx μ 0.01; FedAdam/FedYogi server lr 0.01, β2 0.999, τ 1e-8 as in FLamby's
config; pooled and local train 50 epochs, FLamby's NUM_EPOCHS_POOLED; FLamby's own federated
runs used local SGD, lr 1e-4 for FedAvg/FedAdam/FedYogi and 1e-3 for FedProx) and `tuned`,
chosen inside this script from a handful of candidates on a VALIDATION split of each train set
(25%, stratified), never on the test sets; every candidate and its score goes to the JSON.
Tuned pooled and local runs use the tuned optimizer settings for rounds × local steps steps.
"""

from __future__ import annotations

import argparse
import hashlib
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import common
import numpy as np
import opacus
import sklearn
import torch
from rich.console import Console
from rich.table import Table
from sklearn.model_selection import train_test_split

from aipipe.aggregation import aggregator_for
from aipipe.models import arrays_to_model, build_model, weights_to_arrays
from aipipe.models.training import EvalResult, evaluate, train_local
from aipipe.node.home import init_node, open_store
from aipipe.node.ingest import ingest_files
from aipipe.privacy.accountant import epsilon_for
from aipipe.study.blocks import Aggregation, Training
from aipipe.study.features import extract
from aipipe.study.spec import StudySpec, load_study

EXAMPLE = Path("examples/heart-disease")
SITES = ("cleveland", "hungarian", "switzerland", "va")
EPSILON, DELTA = 1.0, 1e-5
FLAMBY_EPOCHS = 50  # FLamby common.py NUM_EPOCHS_POOLED, for pooled and local training
FLAMBY_CLIP = 1.0  # FLamby has no DP in its published table; the study's clip before tuning
VALIDATION_FRACTION = 0.25
# FLamby's published means (NeurIPS 2022 benchmark); Local i is the mean over all 4 test sets.
FLAMBY_REPORTED = {"pooled": 0.735, "fedavg": 0.685, "fedadam": 0.726, "fedyogi": 0.731}
FLAMBY_LOCAL = {"cleveland": 0.722, "hungarian": 0.629, "switzerland": 0.567, "va": 0.637}
FEDERATED = ("fedavg", "fedprox", "fedadam", "fedyogi")
TARGETS = {"none": 0.74, "dp": 0.70}

# Candidates for the tuned setting, scored with FedAvg on the validation split. Few on purpose:
# each one scored is a choice made on data, and the validation sets are small (8–50 rows).
# All take 10 local steps of batch 32: FLamby's 100 steps of batch 4 over 50 rounds cost
# 20,000 steps a site and run, more than this benchmark's time budget allows per candidate.
TRAINING_CANDIDATES: dict[str, list[tuple[Training, float]]] = {
    "none": [
        (Training(rounds=50, local_steps=10, lr=1e-2, batch_size=32, optimizer="adam"), 1.0),
        (Training(rounds=50, local_steps=10, lr=0.1, batch_size=32, optimizer="sgd"), 1.0),
        (Training(rounds=50, local_steps=10, lr=0.5, batch_size=32, optimizer="sgd"), 1.0),
    ],
    "dp": [
        (Training(rounds=10, local_steps=10, lr=0.5, batch_size=32, optimizer="sgd"), 1.0),
        (Training(rounds=10, local_steps=10, lr=0.5, batch_size=32, optimizer="sgd"), 0.5),
        (Training(rounds=10, local_steps=10, lr=0.5, batch_size=64, optimizer="sgd"), 1.0),
        (Training(rounds=30, local_steps=10, lr=0.5, batch_size=32, optimizer="sgd"), 0.5),
    ],
}
MU_CANDIDATES = (0.01, 0.1)
SERVER_LR_CANDIDATES = (0.03, 0.1, 0.3)


@dataclass(frozen=True)
class Site:
    """One hospital's matrices: per-site z-scored (as `extract` gives them) and raw."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    raw_train: np.ndarray
    raw_test: np.ndarray


@dataclass(frozen=True)
class Setting:
    """Local training, DP clip and the per-strategy server knobs of one column of results."""

    name: str
    training: Training
    clip: float
    epochs: int | None  # pooled/local: this many epochs, or None for rounds × local_steps steps
    proximal_mu: float
    fedadam: Aggregation
    fedyogi: Aggregation


@dataclass
class Outcome:
    """One strategy, one seed: per-site test results and, for federated runs, the curve."""

    clients: list[EvalResult]
    curve: list[float] = field(default_factory=list)  # mean per-client accuracy per round
    sigma: dict[str, float] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    all_tests: list[list[float]] = field(default_factory=list)  # local: model i on test j

    @property
    def accuracy(self) -> float:
        return float(np.mean([c.accuracy for c in self.clients]))


# -- data -------------------------------------------------------------------------------------


def load_sites(study: StudySpec, fhir: Path) -> list[Site]:
    """Ingest each site's NDJSON into a fresh node store and extract its matrices."""
    raw_study = study.model_copy(
        update={"preprocessing": study.preprocessing.model_copy(update={"standardize": "none"})}
    )
    sites = []
    with tempfile.TemporaryDirectory(prefix="flamby-heart-") as scratch:
        for name in SITES:
            store = open_store(init_node(Path(scratch) / name, name))
            try:
                ingest_files(store, [fhir / name])
                z, raw = extract(store, study), extract(store, raw_study)
            finally:
                store.close()
            if z.train_ids != raw.train_ids or z.test_ids != raw.test_ids:
                raise RuntimeError(f"{name}: raw and standardized extracts disagree on rows")
            sites.append(
                Site(name, z.x_train, z.y_train, z.x_test, z.y_test, raw.x_train, raw.x_test)
            )
    return sites


def standardize(reference: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """z-score `arrays` with the mean and unbiased std (+1e-9) of `reference`, as extract does."""
    mean, std = reference.mean(axis=0), reference.std(axis=0, ddof=1)
    return [((a - mean) / (std + 1e-9)).astype(np.float32) for a in arrays]


def validation_sites(sites: Sequence[Site]) -> list[Site]:
    """Each train set split 75/25 (stratified when both classes have > 2 rows), re-z-scored on
    its 75%; the 25% plays the test set. Used only to choose the tuned setting."""
    out = []
    for index, site in enumerate(sites):
        counts = np.bincount(site.y_train.astype(np.int64), minlength=2)
        strata = site.y_train if (counts > 2).all() else None
        fit, held = train_test_split(
            np.arange(len(site.y_train)),
            test_size=VALIDATION_FRACTION,
            random_state=1000 + index,
            stratify=strata,
        )
        raw_fit, raw_held = site.raw_train[fit], site.raw_train[held]
        x_fit, x_held = standardize(raw_fit, raw_fit, raw_held)
        y_fit, y_held = site.y_train[fit], site.y_train[held]
        out.append(Site(site.name, x_fit, y_fit, x_held, y_held, raw_fit, raw_held))
    return out


# -- one run of each strategy ----------------------------------------------------------------


def _seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _train_alone(
    spec: StudySpec, x: np.ndarray, y: np.ndarray, steps: int, seed: int, tag: str
) -> tuple[torch.nn.Module, float | None, float | None]:
    """Centralized training (pooled, or one site): one `train_local` call of `steps` steps.

    Under DP, rounds=1 makes train_local calibrate σ for exactly these steps at ε=1.
    """
    training = spec.training.model_copy(update={"rounds": 1, "local_steps": steps})
    model = build_model(spec.model, x.shape[1], seed=seed)
    result = train_local(
        model,
        x,
        y,
        training=training,
        privacy=spec.privacy,
        noise_multiplier=None,
        seed=_seed(seed, tag),
    )
    eps = None
    if result.noise_multiplier is not None and result.sample_rate is not None:
        eps = epsilon_for(result.noise_multiplier, result.sample_rate, steps, DELTA)
    return model, result.noise_multiplier, eps


def centralized_steps(setting: Setting, n: int) -> int:
    if setting.epochs is not None:
        return setting.epochs * math.ceil(n / setting.training.batch_size)
    return setting.training.rounds * setting.training.local_steps


def run_pooled(
    sites: Sequence[Site], spec: StudySpec, setting: Setting, seed: int, *, site_z: bool
) -> tuple[Outcome, Outcome | None]:
    """Pooled training; with pooled statistics also the FLamby-style evaluation of that model."""
    y = np.concatenate([s.y_train for s in sites])
    if site_z:
        x = np.concatenate([s.x_train for s in sites])
        tests = [s.x_test for s in sites]
    else:
        raw = np.concatenate([s.raw_train for s in sites])
        x, *tests = standardize(raw, raw, *[s.raw_test for s in sites])
    steps = centralized_steps(setting, len(y))
    model, sigma, eps = _train_alone(spec, x, y, steps, seed, "pooled")
    clients = [evaluate(model, t, s.y_test) for t, s in zip(tests, sites, strict=True)]
    outcome = Outcome(clients)
    if sigma is not None and eps is not None:
        outcome.sigma, outcome.epsilon = {"pooled": sigma}, {"pooled": eps}
    if site_z:
        return outcome, None
    flamby = Outcome([evaluate(model, s.x_test, s.y_test) for s in sites])
    return outcome, flamby


def run_local(sites: Sequence[Site], spec: StudySpec, setting: Setting, seed: int) -> Outcome:
    """Each site alone; `clients` = own test set, `all_tests[i][j]` = model i on test set j."""
    outcome = Outcome(clients=[])
    for site in sites:
        steps = centralized_steps(setting, len(site.y_train))
        model, sigma, eps = _train_alone(
            spec, site.x_train, site.y_train, steps, seed, f"local:{site.name}"
        )
        outcome.clients.append(evaluate(model, site.x_test, site.y_test))
        outcome.all_tests.append([evaluate(model, s.x_test, s.y_test).accuracy for s in sites])
        if sigma is not None and eps is not None:
            outcome.sigma[site.name], outcome.epsilon[site.name] = sigma, eps
    return outcome


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """`evaluate`'s accuracy (logit > 0, i.e. p > 0.5) without its AUC and loss, per round."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).squeeze(1).numpy()
    return float(((logits > 0) == (y == 1)).mean())


def run_federated(
    sites: Sequence[Site], spec: StudySpec, seed: int, *, curve: bool = True
) -> Outcome:
    """`training.rounds` rounds: every site trains from the global model, the hub aggregates.

    With `curve`, the mean per-client test accuracy is recorded after every round.
    """
    n_features = sites[0].x_train.shape[1]
    global_weights = weights_to_arrays(build_model(spec.model, n_features, seed=seed))
    aggregator = aggregator_for(spec.aggregation, spec.training.proximal_mu)
    outcome = Outcome(clients=[])
    for round_ in range(1, spec.training.rounds + 1):
        aggregator.begin(global_weights)
        for site in sites:
            model = arrays_to_model(global_weights, build_model(spec.model, n_features))
            result = train_local(
                model,
                site.x_train,
                site.y_train,
                training=spec.training,
                privacy=spec.privacy,
                noise_multiplier=None,
                global_weights=global_weights,
                seed=_seed(seed, site.name, round_),
            )
            aggregator.accumulate(result.delta, result.num_examples)
            if result.noise_multiplier is not None and result.sample_rate is not None:
                outcome.sigma[site.name] = result.noise_multiplier
                q, sigma = result.sample_rate, result.noise_multiplier
                total = spec.training.rounds * spec.training.local_steps
                outcome.epsilon[site.name] = epsilon_for(sigma, q, total, DELTA)
        global_weights = aggregator.finalize()
        if curve:
            model = arrays_to_model(global_weights, build_model(spec.model, n_features))
            model.eval()
            outcome.curve.append(
                float(np.mean([_accuracy(model, s.x_test, s.y_test) for s in sites]))
            )
    model = arrays_to_model(global_weights, build_model(spec.model, n_features))
    outcome.clients = [evaluate(model, s.x_test, s.y_test) for s in sites]
    if curve and not math.isclose(outcome.curve[-1], outcome.accuracy, abs_tol=1e-6):
        raise RuntimeError(f"per-round accuracy {outcome.curve[-1]} ≠ evaluate {outcome.accuracy}")
    return outcome


# -- settings and their selection on validation ----------------------------------------------


def flamby_setting() -> Setting:
    fedopt = {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.999, "tau": 1e-8}
    return Setting(
        name="flamby",
        training=Training(rounds=15, local_steps=100, lr=1e-3, batch_size=4, optimizer="adam"),
        clip=FLAMBY_CLIP,
        epochs=FLAMBY_EPOCHS,
        proximal_mu=0.01,
        fedadam=Aggregation(name="fedadam", **fedopt),
        fedyogi=Aggregation(name="fedyogi", **fedopt),
    )


def spec_for(study: StudySpec, setting: Setting, strategy: str, dp: bool) -> StudySpec:
    """The study with this setting's training, privacy and aggregation blocks."""
    mu = setting.proximal_mu if strategy == "fedprox" else 0.0
    aggregation = {
        "fedprox": Aggregation(name="fedprox"),
        "fedadam": setting.fedadam,
        "fedyogi": setting.fedyogi,
    }.get(strategy, Aggregation(name="fedavg"))
    privacy = study.privacy.model_copy(
        update={"mode": "dp" if dp else "none", "clip": setting.clip, "epsilon": EPSILON}
    )
    privacy = privacy.model_copy(update={"delta": DELTA, "accountant": "prv"})
    training = setting.training.model_copy(update={"proximal_mu": mu})
    return study.model_copy(
        update={"training": training, "privacy": privacy, "aggregation": aggregation}
    )


def _score(sites: Sequence[Site], spec: StudySpec, seeds: Sequence[int]) -> float:
    return statistics.fmean(
        run_federated(sites, spec, seed, curve=False).accuracy for seed in seeds
    )


def tune(
    study: StudySpec, val: Sequence[Site], mode: str, seeds: Sequence[int], quick: bool
) -> tuple[Setting, dict[str, Any]]:
    """Choose local training (with FedAvg), then FedProx' μ and FedAdam's server lr, on `val`.

    FedYogi takes FedAdam's server lr: scoring it separately doubled the cost of this step and,
    at these settings, gave the same scores to 3 decimals.
    """
    dp = mode == "dp"
    record: dict[str, Any] = {"training": []}
    base = replace(flamby_setting(), name="tuned", epochs=None)
    scored = []
    for training, clip in TRAINING_CANDIDATES[mode][: 1 if quick else None]:
        if quick:
            training = training.model_copy(update={"rounds": min(training.rounds, 3)})
        setting = replace(base, training=training, clip=clip)
        score = _score(val, spec_for(study, setting, "fedavg", dp), seeds)
        record["training"].append({**_training_dict(setting), "val_accuracy": score})
        scored.append((score, setting))
    chosen = max(scored, key=lambda pair: pair[0])[1]  # the first of equals
    mus = {}
    for mu in MU_CANDIDATES[: 1 if quick else None]:
        mus[mu] = _score(
            val, spec_for(study, replace(chosen, proximal_mu=mu), "fedprox", dp), seeds
        )
    chosen = replace(chosen, proximal_mu=max(mus, key=mus.__getitem__))
    lrs = {}
    for lr in SERVER_LR_CANDIDATES[: 1 if quick else None]:
        trial = replace(chosen, fedadam=Aggregation(name="fedadam", server_lr=lr))
        lrs[lr] = _score(val, spec_for(study, trial, "fedadam", dp), seeds)
    lr = max(lrs, key=lrs.__getitem__)
    chosen = replace(
        chosen,
        fedadam=Aggregation(name="fedadam", server_lr=lr),
        fedyogi=Aggregation(name="fedyogi", server_lr=lr),
    )
    record["fedprox_mu"] = {str(k): v for k, v in mus.items()}
    record["fedadam_server_lr"] = {str(k): v for k, v in lrs.items()}
    record["chosen"] = _setting_dict(chosen)
    return chosen, record


def _training_dict(setting: Setting) -> dict[str, Any]:
    return {**setting.training.model_dump(exclude={"proximal_mu"}), "clip": setting.clip}


def _setting_dict(setting: Setting) -> dict[str, Any]:
    return {
        "name": setting.name,
        **_training_dict(setting),
        "centralized_epochs": setting.epochs,
        "fedprox_mu": setting.proximal_mu,
        "fedadam": setting.fedadam.model_dump(),
        "fedyogi": setting.fedyogi.model_dump(),
    }


# -- the whole grid --------------------------------------------------------------------------

Row = tuple[str, str, bool]  # (setting name, strategy, dp)
Plan = list[tuple[Setting, bool]]


def run_seed(
    sites: Sequence[Site], study: StudySpec, setting: Setting, dp: bool, seed: int
) -> dict[str, Outcome]:
    """One seed of every strategy under `setting`, keyed by strategy label."""
    spec = spec_for(study, setting, "fedavg", dp)
    pooled, flamby_eval = run_pooled(sites, spec, setting, seed, site_z=False)
    out = {"pooled": pooled}
    if flamby_eval is not None:
        out["pooled, FLamby eval"] = flamby_eval
    if not dp:  # the reference for federated runs; skipped under DP to keep the runtime down
        out["pooled, site-z"] = run_pooled(sites, spec, setting, seed, site_z=True)[0]
    out["local"] = run_local(sites, spec, setting, seed)
    for strategy in FEDERATED:
        out[strategy] = run_federated(sites, spec_for(study, setting, strategy, dp), seed)
    return out


def run_grid(
    sites: Sequence[Site], study: StudySpec, plan: Plan, seeds: Sequence[int]
) -> dict[Row, list[Outcome]]:
    results: dict[Row, list[Outcome]] = {}
    for setting, dp in plan:
        for seed in seeds:
            started = time.perf_counter()
            for strategy, outcome in run_seed(sites, study, setting, dp, seed).items():
                results.setdefault((setting.name, strategy, dp), []).append(outcome)
            took = time.perf_counter() - started
            print(
                f"  {setting.name} {'dp' if dp else 'no-dp'} seed {seed}: {took:.1f} s", flush=True
            )
    return results


@dataclass
class ModeResult:
    """Everything one privacy mode produced: its tuned setting, the selection record, results."""

    flamby: Setting
    tuned: Setting
    selection: dict[str, Any]
    results: dict[Row, list[Outcome]]
    seconds: dict[str, float]


def run_mode(
    study: StudySpec, sites: Sequence[Site], mode: str, seeds: Sequence[int], quick: bool
) -> ModeResult:
    """Tune on validation, then run both settings on the test sets, for one privacy mode.

    The two modes share nothing but the data, so they run in two processes (`--jobs 2`); all
    of DP's noise calibrations then happen in one process, where `calibrate_noise` memoises them.
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG notice, PRV's overflow warnings
    np.seterr(all="ignore")
    started, cpu_started = time.perf_counter(), time.process_time()
    tuned, selection = tune(study, validation_sites(sites), mode, seeds, quick)
    tuned_s = time.perf_counter() - started
    print(f"tuned ({mode}) on the validation split in {tuned_s:.0f} s", flush=True)
    flamby = flamby_setting()
    if quick:
        flamby = quick_setting(flamby)
    dp = mode == "dp"
    results = run_grid(sites, study, [(flamby, dp), (tuned, dp)], seeds)
    seconds = {
        "tuning": tuned_s,
        "total": time.perf_counter() - started,
        "cpu": time.process_time() - cpu_started,  # the load-independent cost
    }
    return ModeResult(flamby, tuned, selection, results, seconds)


def run_modes(
    study: StudySpec, sites: Sequence[Site], seeds: Sequence[int], quick: bool, jobs: int
) -> dict[str, ModeResult]:
    modes = ("dp", "none")  # DP first: it is the longer of the two
    if jobs == 1:
        return {mode: run_mode(study, sites, mode, seeds, quick) for mode in modes}
    # spawn, not fork: a forked child of a process that already ran torch can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {mode: pool.submit(run_mode, study, sites, mode, seeds, quick) for mode in modes}
        return {mode: future.result() for mode, future in futures.items()}


# -- summaries, table, JSON ------------------------------------------------------------------

ORDER = ("pooled", "pooled, FLamby eval", "pooled, site-z", "local", *FEDERATED)


def _mean_auc(outcome: Outcome, skip: str | None = None) -> float:
    aucs = [
        c.auc
        for c, name in zip(outcome.clients, SITES, strict=True)
        if c.auc is not None and name != skip
    ]
    return float(np.mean(aucs))


def _first_round(curve: Sequence[float], threshold: float) -> int | None:
    return next((r for r, acc in enumerate(curve, start=1) if acc >= threshold), None)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def summarise(outcomes: Sequence[Outcome], thresholds: dict[str, float]) -> dict[str, Any]:
    accuracy = _mean_std([o.accuracy for o in outcomes])
    summary: dict[str, Any] = {
        "accuracy_mean": accuracy[0],
        "accuracy_std": accuracy[1],
        "auc_mean_std": _mean_std([_mean_auc(o) for o in outcomes]),
        "auc_without_switzerland_mean_std": _mean_std(
            [_mean_auc(o, skip="switzerland") for o in outcomes]
        ),
        "per_site_accuracy": {
            name: statistics.fmean(o.clients[i].accuracy for o in outcomes)
            for i, name in enumerate(SITES)
        },
        "max_epsilon": max((max(o.epsilon.values()) for o in outcomes if o.epsilon), default=None),
    }
    if outcomes[0].curve:
        summary["first_round_at_95pct"] = {
            name: [_first_round(o.curve, 0.95 * ref) for o in outcomes]
            for name, ref in thresholds.items()
        }
    if outcomes[0].all_tests:
        summary["local_on_all_tests"] = {
            name: statistics.fmean(float(np.mean(o.all_tests[i])) for o in outcomes)
            for i, name in enumerate(SITES)
        }
    return summary


def _rounds_cell(firsts: Sequence[int | None] | None) -> str:
    if firsts is None:
        return "n/a"
    reached = [r for r in firsts if r is not None]
    if not reached:
        return f"— (0/{len(firsts)})"
    return f"{statistics.median(reached):g} ({len(reached)}/{len(firsts)})"


def render_main(summaries: dict[Row, dict[str, Any]], settings: Sequence[str]) -> Table:
    table = Table(title="Fed-Heart-Disease, mean per-client test accuracy (mean ± std over seeds)")
    for column in ("setting", "strategy", "DP", "accuracy", "AUC (4)", "AUC (no CH)"):
        table.add_column(column, justify="left" if column in ("setting", "strategy") else "right")
    for name in SITES:
        table.add_column(name[:5], justify="right")
    for column in ("r→95% pooled", "r→95% site-z", "FLamby"):
        table.add_column(column, justify="right")
    for setting in settings:
        for dp in (False, True):
            for strategy in ORDER:
                s = summaries.get((setting, strategy, dp))
                if s is None:
                    continue
                firsts = s.get("first_round_at_95pct", {})
                table.add_row(
                    setting,
                    strategy,
                    "ε=1" if dp else "–",
                    f"{s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f}",
                    "{:.3f} ± {:.3f}".format(*s["auc_mean_std"]),
                    "{:.3f} ± {:.3f}".format(*s["auc_without_switzerland_mean_std"]),
                    *(f"{s['per_site_accuracy'][n]:.3f}" for n in SITES),
                    _rounds_cell(firsts.get("pooled")),
                    _rounds_cell(firsts.get("pooled, site-z")),
                    f"{FLAMBY_REPORTED[strategy]:.3f}"
                    if strategy in FLAMBY_REPORTED and not dp
                    else "",
                    end_section=strategy == ORDER[-1],
                )
    return table


def render_local(summaries: dict[Row, dict[str, Any]], settings: Sequence[str]) -> Table:
    table = Table(title="Local models on all 4 test sets (FLamby's 'Local i'), mean over seeds")
    table.add_column("setting")
    table.add_column("DP", justify="right")
    for name in SITES:
        table.add_column(f"trained at {name}", justify="right")
    for setting in settings:
        for dp in (False, True):
            s = summaries[(setting, "local", dp)]["local_on_all_tests"]
            table.add_row(setting, "ε=1" if dp else "–", *(f"{s[n]:.3f}" for n in SITES))
    table.add_row("FLamby", "–", *(f"{FLAMBY_LOCAL[n]:.3f}" for n in SITES))
    return table


def _seed_record(seed: int, outcome: Outcome) -> dict[str, Any]:
    return {
        "seed": seed,
        "mean_accuracy": outcome.accuracy,
        "clients": {
            name: {"n": c.n, "accuracy": c.accuracy, "auc": c.auc, "loss": c.loss}
            for name, c in zip(SITES, outcome.clients, strict=True)
        },
        "curve": outcome.curve or None,
        "sigma": outcome.sigma or None,
        "epsilon": outcome.epsilon or None,
        "all_tests": outcome.all_tests or None,
    }


def targets(summaries: dict[Row, dict[str, Any]], setting: str) -> dict[str, Any]:
    """Which federated strategies of `setting` meet the accuracy targets."""
    out: dict[str, Any] = {}
    for mode, target in TARGETS.items():
        accs = {st: summaries[(setting, st, mode == "dp")]["accuracy_mean"] for st in FEDERATED}
        best = max(accs, key=accs.__getitem__)
        out[mode] = {
            "target": target,
            "accuracy": accs,
            "met_by": [st for st, acc in accs.items() if acc >= target],
            "best": best,
            "gap_of_best": target - accs[best],
        }
    return out


def machine(threads: int) -> dict[str, Any]:
    return common.machine(
        torch=torch.__version__,
        opacus=opacus.__version__,
        sklearn=sklearn.__version__,
        numpy=np.__version__,
        torch_threads=threads,
    )


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--study", type=Path, default=EXAMPLE / "study.yaml")
    parser.add_argument("--fhir", type=Path, default=EXAMPLE / "fhir")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default bench/results/flamby_heart.json, or $TMPDIR/flamby_heart-quick.json",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 rounds, 2 epochs")
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2, help="processes (2)")
    args = parser.parse_args(argv)
    if args.out is None:  # a smoke run must not overwrite the full run's figures
        quick = Path(tempfile.gettempdir()) / "flamby_heart-quick.json"
        args.out = quick if args.quick else Path("bench/results/flamby_heart.json")
    return args


def quick_setting(setting: Setting) -> Setting:
    rounds = min(setting.training.rounds, 3)
    return replace(
        setting,
        training=setting.training.model_copy(update={"rounds": rounds}),
        epochs=None if setting.epochs is None else 2,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    info = machine(threads=1)
    seeds = list(range(1 if args.quick else args.seeds))
    console = Console(width=200)
    study = load_study(args.study)
    sites = load_sites(study, args.fhir)
    console.print(
        "sites (train/test): "
        + ", ".join(f"{s.name} {len(s.y_train)}/{len(s.y_test)}" for s in sites)
    )
    by_mode = run_modes(study, sites, seeds, args.quick, args.jobs)
    results = {row: o for m in by_mode.values() for row, o in m.results.items()}
    references = {
        name: statistics.fmean(o.accuracy for o in results[("flamby", name, False)])
        for name in ("pooled", "pooled, site-z")
    }
    summaries = {row: summarise(outcomes, references) for row, outcomes in results.items()}
    console.print(render_main(summaries, ("flamby", "tuned")))
    console.print(render_local(summaries, ("flamby", "tuned")))
    met = {name: targets(summaries, name) for name in ("flamby", "tuned")}
    for name, by_target in met.items():
        for mode, t in by_target.items():
            console.print(
                f"target {mode} ≥ {t['target']:.2f} ({name}): met by {t['met_by'] or 'none'}; "
                f"best {t['best']} {t['accuracy'][t['best']]:.3f}"
            )
    runtime = time.perf_counter() - started
    console.print(f"runtime {runtime:.0f} s")
    report = build_report(args, info, runtime, sites, seeds, by_mode, references, met)
    report["results"] = [
        {
            "setting": row[0],
            "strategy": row[1],
            "dp": row[2],
            "summary": summaries[row],
            "seeds": [_seed_record(seed, o) for seed, o in zip(seeds, outcomes, strict=True)],
        }
        for row, outcomes in results.items()
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {args.out}")


def build_report(
    args: argparse.Namespace,
    info: dict[str, Any],
    runtime: float,
    sites: Sequence[Site],
    seeds: Sequence[int],
    by_mode: dict[str, ModeResult],
    references: dict[str, float],
    met: dict[str, Any],
) -> dict[str, Any]:
    return {
        "benchmark": "flamby_heart",
        "command": shlex.join([".venv/bin/python", "bench/flamby_heart.py", *sys.argv[1:]]),
        "runtime_s": runtime,
        "seconds_per_mode": {mode: m.seconds for mode, m in by_mode.items()},
        "machine": {**info, "loadavg_at_end": os.getloadavg(), "jobs": args.jobs},
        "seeds": list(seeds),
        "privacy": {"epsilon_per_site": EPSILON, "delta": DELTA, "accountant": "prv"},
        "data": {
            s.name: {
                "train": len(s.y_train),
                "test": len(s.y_test),
                "train_positive_rate": float(s.y_train.mean()),
                "test_positive_rate": float(s.y_test.mean()),
            }
            for s in sites
        },
        "settings": {
            "flamby": _setting_dict(by_mode["none"].flamby),
            "tuned_none": _setting_dict(by_mode["none"].tuned),
            "tuned_dp": _setting_dict(by_mode["dp"].tuned),
        },
        "selection_on_validation": {mode: m.selection for mode, m in by_mode.items()},
        "references_for_95pct": references,
        "flamby_reported": {**FLAMBY_REPORTED, "local_on_all_tests": FLAMBY_LOCAL},
        "targets": met,
    }


if __name__ == "__main__":
    main()
