"""What the personal-model tests share: the heart-disease study made to personalize (with the
real `finetune`) and personal models saved through the store. These tests are about where the
personal model is kept, chosen and used, not about the method."""

from __future__ import annotations

from typing import Any

import numpy as np

from aipipe.models import Arrays
from aipipe.models.training import EvalResult
from aipipe.node.personal import PersonalModels, StoredPersonal
from aipipe.personalization import PersonalModel
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
