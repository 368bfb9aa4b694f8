"""A site training alone: the baseline every federated result is compared with.

Same model, same features, same privacy terms and the same total number of DP-SGD steps as
the whole federated study (rounds × local steps), but no other site's updates.

Training alone on a site's patients and showing its metrics is a release like any other: on a
node it is charged to the site ledger as a release of kind "baseline" (planned within the
study's share and what is left of the site, refused past either). Only on public benchmark data
(the UCI heart-disease sites of the demo) may it run outside any ledger, and the caller says so
with `benchmark_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import secrets

from aipipe.models import build_model
from aipipe.models.training import EvalResult, evaluate, train_local
from aipipe.privacy.engine import Plan, PrivacyEngine
from aipipe.privacy.errors import PrivacyError
from aipipe.privacy.ledger import BudgetLedger
from aipipe.study.features import FeatureMatrix
from aipipe.study.spec import StudySpec


def train_alone(
    matrix: FeatureMatrix,
    spec: StudySpec,
    *,
    ledger: BudgetLedger | None = None,
    benchmark_only: bool = False,
    seed: int | None = None,
) -> EvalResult:
    """Train and evaluate the study's model on this site alone, charged to `ledger`, or
    uncharged with `benchmark_only=True` (public data only). `seed` fixes the model's start
    and the DP draws, for benchmarks; left out, the draws come from a secret fresh seed."""
    if (ledger is None) != benchmark_only:
        raise PrivacyError(
            "a solo baseline spends ε on the site's patients: pass the node's ledger to charge "
            "it, or benchmark_only=True when the data is public (and not both)"
        )
    steps = spec.training.rounds * spec.training.local_steps
    training = spec.training.model_copy(update={"rounds": 1, "local_steps": steps})
    model = build_model(spec.model, len(matrix.columns), seed=seed or 0)
    engine = None if ledger is None else PrivacyEngine(ledger)
    plan: Plan | None = None
    if engine is not None:
        if spec.privacy.mode != "dp":
            raise PrivacyError(
                f"study '{spec.name}' trains without DP; a solo baseline on a node's patients "
                "needs DP (benchmark_only=True is for public data)"
            )
        plan = engine.plan_baseline(spec, len(matrix.y_train))
    train_local(
        model,
        matrix.x_train,
        matrix.y_train,
        training=training,
        privacy=spec.privacy,
        noise_multiplier=None if plan is None else plan.noise_multiplier,
        seed=secrets.randbits(63) if seed is None else seed,
    )
    result = evaluate(model, matrix.x_test, matrix.y_test)
    if engine is not None and plan is not None:
        # The metrics are what leaves: their cost and digest are written before they are shown.
        payload = json.dumps(dataclasses.asdict(result), sort_keys=True).encode()
        engine.charge(plan, payload)
    return result
