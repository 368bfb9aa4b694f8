"""What `aipipe node personal` shows and exports: a site's personal models beside the global
versions they were derived from, and the one way a personal model leaves the node.

The listing is for the site's own people (it runs on the node and reads only its store): per
global version, the global model's and the personal model's test accuracy and AUC, the personal
model's validation loss and chosen hyper-parameters, which one is served (the lowest validation
loss: `aipipe.node.personal`), and the ε the study has spent here.

Export writes the served personal model as safetensors, only with `allow_phi_derived`: a personal
model is derived from this site's patients without DP noise, so it must not leave the hospital
unless the site decides so, by its own command. Either way the attempt is audited.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aipipe.audit.log import AuditLog
from aipipe.errors import ConfigError
from aipipe.node.lineage import ModelLineage
from aipipe.node.personal import PersonalModels
from aipipe.store.node_store import NodeStore
from aipipe.wire.tensors import encode_arrays

EXPORT = "personal.export"


def personal_report(store: NodeStore, study: str) -> dict[str, Any]:
    """The site's personal models of `study`, oldest first, and the ε it spent on the study."""
    from aipipe.privacy.ledger import BudgetLedger  # imports torch: only when needed

    kept = PersonalModels(store.db, at_rest=store.at_rest)
    served, lineage = kept.served(study), ModelLineage(store.db)
    rows = []
    for mine in kept.all(study):
        evaluation = lineage.evaluation(study, mine.version)
        rows.append({
            "version": mine.version, "round": mine.round, "method": mine.method,
            "global_test_accuracy": None if evaluation is None else evaluation.accuracy,
            "global_test_auc": None if evaluation is None else evaluation.auc,
            "personal_test_accuracy": mine.test.accuracy, "personal_test_auc": mine.test.auc,
            "validation_loss": mine.validation.loss, "chosen": mine.chosen,
            "sha256": mine.sha256, "served": served is not None and mine.version == served.version,
        })  # fmt: skip
    ledger = BudgetLedger(store.db)
    dp = study in {s.study for s in ledger.status()}
    return {
        "study": study,
        "epsilon_spent": ledger.spent(study) if dp else None,
        "served": None if served is None else served.label,
        "selection": "lowest validation loss (never a test number)",
        "models": rows,
    }


def export_personal(
    store: NodeStore, audit: AuditLog, actor: str, study: str, out: Path, *, allow_phi_derived: bool
) -> str:
    """Write the served personal model of `study` to `out` (safetensors, mode 0600); return its
    sha256. Refused (ConfigError, audited) without `allow_phi_derived` or without a model."""
    served = PersonalModels(store.db, at_rest=store.at_rest).served(study)
    details: dict[str, Any] = {"study": study, "allow_phi_derived": allow_phi_derived}
    reason = None
    if served is None:
        reason = f"this node has no personal model of study '{study}' to export"
    elif not allow_phi_derived:
        reason = (
            f"refused to export the personal model of study '{study}': it is derived from this "
            "site's patients' data without DP noise and must not leave the hospital. If the "
            "site has decided it may, run again with --allow-phi-derived"
        )
    if reason is not None or served is None:
        audit.append(EXPORT, actor=actor, resource=f"study/{study}", outcome="refused",
                     details={**details, "reason": reason})  # fmt: skip
        raise ConfigError(str(reason))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(encode_arrays(served.weights))
    details.update(version=served.version, sha256=served.sha256)
    audit.append(EXPORT, actor=actor, resource=f"study/{study}", details=details)
    return served.sha256
