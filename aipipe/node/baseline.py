"""A site training alone: the baseline every federated result is compared with.

Same model, same features, same privacy budget and the same total number of DP-SGD steps as
the whole federated study (rounds × local steps), but no other site's updates.
"""

from __future__ import annotations

from aipipe.models import build_model
from aipipe.node.training import EvalResult, evaluate, train_local
from aipipe.study.features import FeatureMatrix
from aipipe.study.spec import StudySpec


def train_alone(matrix: FeatureMatrix, spec: StudySpec, *, seed: int = 0) -> EvalResult:
    steps = spec.training.rounds * spec.training.local_steps
    training = spec.training.model_copy(update={"rounds": 1, "local_steps": steps})
    model = build_model(spec.model, len(matrix.columns), seed=seed)
    train_local(
        model,
        matrix.x_train,
        matrix.y_train,
        training=training,
        privacy=spec.privacy,
        noise_multiplier=None,
        seed=seed,
    )
    return evaluate(model, matrix.x_test, matrix.y_test)
