"""What a node's releases outside a training round need of it (`SiteNode`, which `NodeWorker`
is), and the two audits every release shares: a refusal with its reason, and the disjoint-cohort
claims a release verified or refused."""

from __future__ import annotations

from typing import Protocol

from aipipe.audit.log import AuditLog
from aipipe.node.client import HubClient
from aipipe.privacy.cohorts import DISJOINT, Cohort, StudyGroup
from aipipe.privacy.engine import PrivacyEngine
from aipipe.store.node_store import NodeStore
from aipipe.study.features import FeatureMatrix
from aipipe.study.spec import StudySpec


class SiteNode(Protocol):
    """The node as its evaluation and statistics releases see it."""

    name: str
    store: NodeStore
    client: HubClient
    audit: AuditLog

    def features(self, spec: StudySpec) -> FeatureMatrix: ...

    def privacy(self) -> PrivacyEngine: ...

    def cohort(self, spec: StudySpec) -> Cohort: ...


def audit_refusal(
    node: SiteNode, action: str, spec: StudySpec, number: int, exc: Exception
) -> None:
    node.audit.append(
        action,
        actor=node.name,
        resource=f"study/{spec.name}",
        outcome="refused",
        details={"round": number, "reason": str(exc)},
    )


def audit_cohorts(
    node: SiteNode, before: dict[str, StudyGroup], after: dict[str, StudyGroup]
) -> None:
    """Audit each disjoint-cohort claim the release verified or refused (no counts of ids)."""
    for study, group in after.items():
        if group.claim == DISJOINT and before.get(study) != group:
            node.audit.append(
                "privacy.cohort",
                actor=node.name,
                resource=f"study/{study}",
                outcome="success" if group.group == DISJOINT else "refused",
                details={"group": group.group, "reason": group.reason},
            )
