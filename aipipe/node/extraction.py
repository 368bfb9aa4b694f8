"""A study's feature matrix on this node, audited the same way whoever asks (the daemon's worker,
`Node.extract` under `study features`): one `features.extract` event with counts only."""

from __future__ import annotations

from typing import Any

from aipipe.audit.events import Action
from aipipe.audit.log import AuditLog
from aipipe.store.node_store import NodeStore
from aipipe.study.features import FeatureMatrix, extract
from aipipe.study.spec import StudySpec


def audited_extract(
    store: NodeStore,
    audit: AuditLog,
    actor: str,
    spec: StudySpec,
    details: dict[str, Any] | None = None,
) -> FeatureMatrix:
    """Extract `spec`'s features from `store` and record it (patients in the cohort, train and
    test rows; never ids), with `details` added."""
    matrix = extract(store, spec)
    counts = {
        "cohort": matrix.cohort,
        "train": len(matrix.train_ids),
        "validation": len(matrix.val_ids),
        "test": len(matrix.test_ids),
    }
    audit.append(
        Action.FEATURES_EXTRACT,
        actor=actor,
        resource=f"study/{spec.name}",
        details={**counts, **(details or {})},
    )
    return matrix
