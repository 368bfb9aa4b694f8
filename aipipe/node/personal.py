"""A site's personal models: made from each round's evaluated result when the node is idle
(`aipipe.node.personal_pending`), kept in the node store, chosen on validation, served inside
the hospital, never sent.

When a study personalizes (`personalization.method` is not `none`), the node turns each
lineage-verified global version into its own model (`Personalizer.personalize`, with the
site's training state and the previous personal model's carry) and keeps it here, in the table
`personal_models`, keyed by (study, global version):

- the tensors (safetensors bytes, `aipipe.wire.tensors`: never a pickle) and their sha256, the
  carry tensors, the method and the hyper-parameters it chose on the validation split;
- its loss, accuracy and AUC on the validation split and on the test split, and the exact
  validation report on the test split (`ValidationReport.as_card()`) that the node's gate reads.

Each one is audited (`personal.model`: study, version, sha256, what was chosen; no values).

The model a site serves for a study is, among its personal models, the one with the lowest
VALIDATION loss (ties: the newest round): checkpoint selection on validation, never on test.
The test numbers are for the site's own report (`aipipe node personal`) and the gate only.
A personal model is derived from patients' data without DP noise: nothing here is sent to the
hub; `aipipe node personal export --allow-phi-derived` is the one way out (README,
"Personalization").
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlite_utils import Database
from sqlite_utils.db import Table

from aipipe.audit.log import AuditLog
from aipipe.cds.cards import PERSONAL_PREFIX
from aipipe.errors import ConfigError
from aipipe.models import Arrays, arrays_to_model
from aipipe.models.training import EvalResult, evaluate
from aipipe.node.personal_state import PersonalStates
from aipipe.personalization import PersonalModel, SiteData, personalizer_for
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.store.node_store import NodeStore
from aipipe.study.features import FeatureMatrix
from aipipe.study.spec import StudySpec
from aipipe.study.validation import ModelQualityError, ValidationReport, from_card, judge
from aipipe.wire.tensors import decode_arrays, encode_arrays

TABLE = "personal_models"
ACTION = "personal.model"


def personalizes(spec: StudySpec) -> bool:
    """Whether the study gives each site a model of its own."""
    return spec.personalization is not None and spec.personalization.method != "none"


@dataclass(frozen=True)
class StoredPersonal:
    """One personal model as the node keeps it."""

    study: str
    version: str  # the global version it was derived from
    round: int
    method: str
    sha256: str  # of the safetensors bytes of `weights`
    weights: Arrays
    carry: Arrays
    chosen: dict[str, float]
    validation: EvalResult
    test: EvalResult
    report: dict[str, Any] | None  # the exact ValidationReport card on the test split
    created: str

    @property
    def label(self) -> str:
        """The model version a card, RiskAssessment or prediction names: the site's personal
        model (its sha256) derived from global `version`."""
        return f"{PERSONAL_PREFIX}{self.sha256[:16]}-{self.version}"

    def describe(self) -> dict[str, Any]:
        """What a model card says of it (no values of any patient)."""
        return {
            "sha256": self.sha256,
            "method": self.method,
            "derived_from": self.version,
            "round": self.round,
            "chosen": self.chosen,
            "validation_loss": self.validation.loss,
            "selection": "lowest validation loss among this site's personal models",
        }


class PersonalModels:
    """The node's personal models (the table `personal_models` of its store); their tensors
    sealed under `at_rest` in a home encrypted at rest."""

    def __init__(self, db: Database, *, at_rest: AtRest = PLAIN) -> None:
        self.db = db
        self.at_rest = at_rest
        self._table.create(
            {
                "study": str, "version": str, "round": int, "method": str, "sha256": str,
                "weights": bytes, "carry": bytes, "chosen": str,
                "val_n": int, "val_loss": float, "val_accuracy": float, "val_auc": float,
                "test_n": int, "test_loss": float, "test_accuracy": float, "test_auc": float,
                "report": str, "created": str,
            },
            pk=("study", "version"),
            if_not_exists=True,
        )  # fmt: skip

    def save(
        self,
        study: str,
        version: str,
        number: int,
        method: str,
        personal: PersonalModel,
        test: EvalResult,
        report: dict[str, Any] | None,
    ) -> StoredPersonal:
        """Keep `personal`, derived from global `version` in round `number`; return it."""
        blob = encode_arrays(personal.weights)
        val = personal.validation
        label = f"{TABLE}/{study}/{version}"
        row = {
            "study": study, "version": version, "round": number, "method": method,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "weights": self.at_rest.seal(blob, f"{label}/weights"),
            "carry": self.at_rest.seal(encode_arrays(personal.carry), f"{label}/carry"),
            "chosen": json.dumps(personal.chosen),
            "val_n": val.n, "val_loss": val.loss, "val_accuracy": val.accuracy,
            "val_auc": val.auc, "test_n": test.n, "test_loss": test.loss,
            "test_accuracy": test.accuracy, "test_auc": test.auc,
            "report": None if report is None else json.dumps(report),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
        self._table.upsert(row, pk=("study", "version"))
        return self._stored(row)

    def get(self, study: str, version: str) -> StoredPersonal | None:
        rows = list(self._table.rows_where("study = ? AND version = ?", [study, version]))
        return self._stored(rows[0]) if rows else None

    def all(self, study: str) -> list[StoredPersonal]:
        """Every personal model of `study`, oldest round first."""
        where = self._table.rows_where("study = ?", [study], order_by="round, created")
        return [self._stored(row) for row in where]

    def _stored(self, row: Mapping[str, Any]) -> StoredPersonal:
        label = f"{TABLE}/{row['study']}/{row['version']}"
        where = f"personal model of {row['study']} from {row['version']}"
        return _stored({**row, **{part: self.at_rest.open(row[part], f"{label}/{part}",
                                                           where=f"{where} ({part})")
                                  for part in ("weights", "carry")}})  # fmt: skip

    def latest(self, study: str) -> StoredPersonal | None:
        """The newest one (whose carry the next one starts from)."""
        kept = self.all(study)
        return kept[-1] if kept else None

    def served(self, study: str) -> StoredPersonal | None:
        """The one the site serves: the lowest validation loss (never a test number); among
        equal losses the newest round."""
        kept = self.all(study)
        return min(reversed(kept), key=lambda p: p.validation.loss) if kept else None

    @property
    def _table(self) -> Table:
        return cast(Table, self.db[TABLE])


def _stored(row: Mapping[str, Any]) -> StoredPersonal:
    def result(prefix: str) -> EvalResult:
        auc = row[f"{prefix}_auc"]
        return EvalResult(
            n=int(row[f"{prefix}_n"]),
            accuracy=float(row[f"{prefix}_accuracy"]),
            auc=None if auc is None else float(auc),
            loss=float(row[f"{prefix}_loss"]),
        )

    return StoredPersonal(
        study=str(row["study"]),
        version=str(row["version"]),
        round=int(row["round"]),
        method=str(row["method"]),
        sha256=str(row["sha256"]),
        weights=decode_arrays(row["weights"]),
        carry=decode_arrays(row["carry"]),
        chosen={str(k): float(v) for k, v in json.loads(row["chosen"]).items()},
        validation=result("val"),
        test=result("test"),
        report=json.loads(row["report"]) if row["report"] else None,
        created=str(row["created"]),
    )


def make_personal(
    store: NodeStore,
    audit: AuditLog,
    actor: str,
    spec: StudySpec,
    number: int,
    version: str,
    weights: Arrays,
    matrix: FeatureMatrix,
    *,
    guard: Callable[[], AbstractContextManager[None]] = nullcontext,
) -> StoredPersonal:
    """The site's personal model from global `version` (its `weights`, lineage-verified by the
    caller), kept and audited; the one already kept when this version was personalized before.
    Nothing here is sent anywhere. `guard` wraps the training and scoring, not the keeping
    (the daemon's lets SIGTERM abort there: then nothing is kept)."""
    from aipipe.node.validation import assess  # imports torch

    kept = PersonalModels(store.db, at_rest=store.at_rest)
    made = kept.get(spec.name, version)
    if made is not None:
        return made
    method = personalizer_for(spec)
    model = arrays_to_model(weights, method.build(len(matrix.columns)))
    previous = kept.latest(spec.name)
    carry = previous.carry if previous is not None else {}
    # The local training state of the round that made `version` (or the latest before it):
    # FedPer's head, FENDA's local extractor and head; empty for the other methods.
    trained = PersonalStates(store.db, at_rest=store.at_rest).latest(
        spec.name, method.name, before=number + 1
    )
    state = trained.tensors if trained is not None else {}
    with guard():
        personal = method.personalize(
            model, state, carry, SiteData.of(matrix), seed=secrets.randbits(63)
        )
        scored = arrays_to_model(personal.weights, method.build(len(matrix.columns)))
        test = evaluate(scored, matrix.x_test, matrix.y_test)
        report = assess(spec, scored, matrix).report.as_card()
    stored = kept.save(spec.name, version, number, method.name, personal, test, report)
    audit.append(
        ACTION,
        actor=actor,
        resource=f"study/{spec.name}",
        details={"study": spec.name, "version": version, "sha256": stored.sha256,
                 "method": method.name, "chosen": personal.chosen},
    )  # fmt: skip
    return stored


def served_personal(
    store: NodeStore, spec: StudySpec, *, audit: AuditLog, actor: str, use: str
) -> StoredPersonal:
    """The personal model this site serves for `spec`, past the study's validation minimum on
    its own test evaluation (audited as `validation`, as the global gate is). `ConfigError`
    when there is none yet; `ModelQualityError` when it misses the minimum."""
    stored = PersonalModels(store.db, at_rest=store.at_rest).served(spec.name)
    if stored is None:
        raise ConfigError(
            f"study '{spec.name}' personalizes ({_method(spec)}) but this node has no personal "
            "model yet; it makes one from an evaluated round's result when it is idle: run "
            "`aipipe node start` through a round (`--once` makes it before it stops)"
        )
    if spec.validation is None:
        return stored
    report: ValidationReport | None = (
        None if stored.report is None else judge(from_card(stored.report), spec.validation)
    )
    failures = ["no test evaluation kept"] if report is None else report.failures
    audit.append(
        "validation",
        actor=actor,
        resource=f"model/{stored.version}",
        outcome="refused" if failures else "success",
        details={"study": spec.name, "use": use, "failures": failures,
                 "personal": stored.sha256},
    )  # fmt: skip
    if failures:
        raise ModelQualityError(
            f"this site's personal model {stored.sha256[:12]} of study '{spec.name}' is not "
            f"served: on this node's held-out patients it misses the study's validation "
            f"minimum: {'; '.join(failures)}. Train further or revise the study"
        )
    return stored


def _method(spec: StudySpec) -> str:
    return spec.personalization.method if spec.personalization is not None else "none"
