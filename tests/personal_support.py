"""What the personal-model tests share: the heart-disease study made to personalize, a stand-in
`finetune` where the method is not registered yet, and personal models saved through the store.

The stand-in is only used when `aipipe.personalization.PERSONALIZERS` has no `finetune` (the
methods land in their own modules): it fine-tunes the global model on the fit split for the
block's `steps`, as FLamby's FedAvgFineTuning does, and reports its validation numbers. These
tests are about where the personal model is kept, chosen and used, not about the method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest
from torch import nn

from aipipe.models import Arrays
from aipipe.models.training import EvalResult, evaluate, train_local
from aipipe.node.personal import PersonalModels, StoredPersonal
from aipipe.personalization import Personalizer, PersonalModel, SiteData, registry
from aipipe.personalization.base import NO_DP
from aipipe.study.spec import StudySpec, load_study
from tests.cds_support import ROOT

STUDY_FILE = ROOT / "examples" / "heart-disease" / "study.yaml"
FHIR_DIR = ROOT / "examples" / "heart-disease" / "fhir"
NAME = "fed-heart-disease"


def personal_study(**overrides: Any) -> dict[str, Any]:
    """The shipped heart-disease study, personalizing with `finetune`, two sites enough."""
    spec = load_study(STUDY_FILE).model_dump(mode="json", exclude_none=True)
    spec.update(min_nodes=2, personalization={"method": "finetune", "steps": 20})
    spec["training"] = {**spec["training"], "rounds": 2}
    spec.update(overrides)
    return spec


class StandInFinetune(Personalizer):
    name: ClassVar[str] = "finetune"

    def personalize(
        self, model: nn.Module, state: Arrays, carry: Arrays, data: SiteData, *, seed: int
    ) -> PersonalModel:
        result = train_local(model, data.x_fit, data.y_fit, training=self.local_training(),
                             privacy=NO_DP, noise_multiplier=None, seed=seed)  # fmt: skip
        return PersonalModel(
            weights=result.weights,
            validation=evaluate(model, data.x_val, data.y_val),
            chosen={"steps": float(self.settings.steps)},
        )


def with_finetune() -> Iterator[None]:
    """Register the stand-in while a test runs, where no `finetune` is registered."""
    if "finetune" in registry.PERSONALIZERS:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            registry, "PERSONALIZERS", {**registry.PERSONALIZERS, "finetune": StandInFinetune}
        )
        yield


def save_personal(
    db: Any,
    spec: StudySpec,
    weights: Arrays,
    *,
    version: str,
    number: int = 1,
    val_loss: float,
    test_loss: float = 0.5,
    report: dict[str, Any] | None = None,
) -> StoredPersonal:
    """A personal model with known validation and test numbers, saved through the store API."""
    validation = EvalResult(n=20, accuracy=0.8, auc=0.85, loss=val_loss)
    test = EvalResult(n=40, accuracy=0.7, auc=0.75, loss=test_loss)
    personal = PersonalModel(weights=weights, validation=validation, chosen={"steps": 7.0},
                             carry={"v": np.ones(2, np.float32)})  # fmt: skip
    return PersonalModels(db).save(spec.name, version, number, "finetune", personal, test, report)


def shifted(weights: Arrays, by: float) -> Arrays:
    """`weights` with the head's bias moved by `by`: a model every probability tells apart."""
    out = {k: np.array(v, copy=True) for k, v in weights.items()}
    out["head.bias"] = out["head.bias"] + np.float32(by)
    return out
