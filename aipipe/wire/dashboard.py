"""What `GET /v1/dashboard` answers: the consortium at a glance, for the admin, scientists and
auditors (`aipipe.hub.dashboard` builds it from the hub's store and audit log).

Every number is one the hub already holds: ε is what each site stated in its plaintext update
headers (secure studies disclose none: `epsilon_disclosed` is false and every site's ε is None),
accuracy and AUC are what sites reported for a round's version (DP-noised where they report
any), the pooled AUC is the study's validation of the sites' DP histograms. Nothing is derived
about a patient.
"""

from __future__ import annotations

from pydantic import Field

from aipipe.wire.messages import Wire


class DashboardNode(Wire):
    name: str
    state: str
    enrolled_at: str
    last_seen: str | None
    # Once a study's `detection` has screened the node (None until then).
    reputation: float | None = None


class SiteRound(Wire):
    """One site in one round: whether it contributed, the ε it stated, what it reported."""

    node: str
    status: str  # selected, reported or declined
    epsilon: float | None = None  # cumulative ε stated in its update header; None: not disclosed
    accuracy: float | None = None
    auc: float | None = None
    local_accuracy: float | None = None
    local_auc: float | None = None


class DashboardRound(Wire):
    round: int
    state: str
    opened_at: str
    closed_at: str | None
    deadline: str
    reason: str | None
    participants: list[str]  # the sites whose update went into the round
    selected: int
    declined: dict[str, str]
    result_version: str | None
    pooled_auc: float | None = None  # the study's validation of the sites' DP histograms
    sites: list[SiteRound] = Field(default_factory=list)


class DashboardStudy(Wire):
    name: str
    digest: str
    published_at: str
    secure: str  # none, secagg or ckks
    privacy: str  # dp or none
    epsilon_target: float | None  # the study's privacy.epsilon (None without DP)
    epsilon_disclosed: bool  # plaintext studies: each update states its site's ε
    # Each site's latest stated cumulative ε in this study (plaintext studies only).
    epsilon_by_site: dict[str, float]
    current_version: str | None
    rounds: list[DashboardRound]


class DashboardVersion(Wire):
    version: str
    study: str
    round: int
    parent: str | None
    created_at: str
    aggregator: str
    contributors: int
    sha256: str  # of the weights (safetensors bytes) as stored
    current: bool  # the study's head


class AuditStatus(Wire):
    """The hub's own audit chain, verified against the hub's key when the dashboard was read."""

    verified: bool
    events: int  # the chain verifies up to this seq (when `verified`)
    broken_at: int | None = None  # the first event that does not verify
    problem: str | None = None  # why, as `aipipe audit verify` says it
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    last_checkpoint_time: str | None = None
    unanchored: int = 0  # events after the last signed checkpoint


class Dashboard(Wire):
    hub: str
    generated_at: str
    nodes: list[DashboardNode]
    studies: list[DashboardStudy]
    versions: list[DashboardVersion]
    audit: AuditStatus
