"""`Node`: one institution's node home as an object; the CLI parses, calls it and renders.

`Node.open(home)` owns the paths, the store, the audit log, the identity, the vault and the hub
client, each opened on first use (an ingest from files never touches the hub) and all closed by
`close()` (or the `with` block). Every operation that acts on the site's data or its approvals
audits itself here, so whether an action is audited does not depend on who calls it.

Heavy modules (torch, scikit-learn) are imported inside the operations that need them: opening a
node, ingesting and `status` stay light.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from aipipe.audit.events import Action
from aipipe.audit.log import AuditLog
from aipipe.errors import ConfigError
from aipipe.fhir.files import Progress
from aipipe.fhir.server import FhirServerSource
from aipipe.fhir.smart import smart_auth_for
from aipipe.fhir.smart_key import SmartKey
from aipipe.node import ingest
from aipipe.node.client import HubClient
from aipipe.node.home import (
    enrol,
    hub_client,
    init_node,
    node_vault,
    open_audit,
    open_node,
    open_store,
    set_hub_ca,
    setup_smart,
)
from aipipe.node.ingest import IngestReport
from aipipe.node.vault import SecureVault
from aipipe.secure.identity import Identity
from aipipe.settings import NodePaths
from aipipe.store.node_store import NodeStore
from aipipe.study.spec import StudySpec

if TYPE_CHECKING:
    from fastapi import FastAPI

    from aipipe.attacks import Attack
    from aipipe.cds import FhirAccess, JwtPolicy
    from aipipe.node.daemon import Daemon
    from aipipe.node.predict import Prediction
    from aipipe.node.validation import Tried
    from aipipe.node.worker import NodeWorker
    from aipipe.secure.at_rest import AtRestKey
    from aipipe.study.features import FeatureMatrix

Log = Callable[[str], None]


@dataclass(frozen=True)
class Approval:
    """What `Node.approve` pinned: the study, its digest and its share of the site's ε."""

    study: str
    digest: str
    epsilon_budget: float
    columns: list[str]


@dataclass(frozen=True)
class Scores:
    """What `Node.predict` scored with which model version, and how many it wrote back."""

    study: str
    version: str
    predictions: list[Prediction] = field(default_factory=list)
    written: int = 0
    current: str | None = None  # the study's current version (older_than_current: not served)
    passed_over: list[Tried] = field(default_factory=list)  # newer versions, why not served

    @property
    def older_than_current(self) -> bool:
        return self.current is not None and self.current != self.version

    @property
    def scored(self) -> list[Prediction]:
        return [p for p in self.predictions if p.probability is not None]


class Node:
    """An opened node home. Use as a context manager, or call `close()`."""

    def __init__(self, paths: NodePaths, *, hub: HubClient | None = None) -> None:
        """`hub`: a client to use instead of the one the home's enrolment makes (an in-process
        hub, say); the node closes it with the rest."""
        self.paths = paths
        self._store: NodeStore | None = None
        self._audit: AuditLog | None = None
        self._identity: Identity | None = None
        self._hub = hub

    @classmethod
    def open(
        cls, home: Path, *, hub: HubClient | None = None, at_rest_key: AtRestKey | None = None
    ) -> Node:
        """The node at `home` (NodeNotFoundError if there is none; AtRestKeyError if it is
        encrypted at rest and `at_rest_key` is not its key)."""
        return cls(open_node(home, at_rest_key), hub=hub)

    @classmethod
    def init(cls, home: Path, name: str, *, force: bool = False, allow_non_private: bool = False,
             at_rest_key: AtRestKey | None = None) -> Node:  # fmt: skip
        """Create a node home (config, store, keys, audit log; audited as node.init; sealed
        under `at_rest_key` if given) and open it. With `force` an existing node is moved aside
        and its privacy ledger carried over."""
        return cls(init_node(home, name, force=force, allow_non_private=allow_non_private,
                             at_rest_key=at_rest_key))  # fmt: skip

    def set_hub_ca(self, source: Path) -> None:
        """Trust the CA in `source` (a PEM file, copied into the home) on every call to the hub."""
        set_hub_ca(self.paths, source)

    def setup_smart(self, client_id: str, alg: str) -> dict[str, Any]:
        """Create the SMART client key for EHR `client_id`; return its public JWK Set."""
        return setup_smart(self.paths, client_id, alg)

    def smart_jwks(self) -> tuple[str, dict[str, object]]:
        """The SMART client id and the public JWK Set of its key (ConfigError without one)."""
        client_id = self.paths.config.smart_client_id
        if client_id is None:
            raise ConfigError(f"node {self.name} has no SMART client; use --smart-client-id")
        key = SmartKey.load(self.paths.smart_key, at_rest=self.paths.at_rest)
        return client_id, key.public_jwks()

    def enrol(self, token: str) -> str:
        """Register this node's public keys with the hub the token names; return its URL."""
        return enrol(self.paths, token)

    # -- what the node owns, opened on first use ------------------------------------------------

    @property
    def name(self) -> str:
        return self.paths.config.name

    @property
    def store(self) -> NodeStore:
        if self._store is None:
            self._store = open_store(self.paths)
        return self._store

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            self._audit = open_audit(self.paths)
        return self._audit

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            self._identity = Identity.load(self.paths.identity_key, at_rest=self.paths.at_rest)
        return self._identity

    @property
    def vault(self) -> SecureVault:
        return node_vault(self.paths)

    @property
    def hub(self) -> HubClient:
        """The hub client, authenticated as this node (ConfigError when not enrolled)."""
        if self._hub is None:
            self._hub = hub_client(self.paths)
        return self._hub

    @property
    def is_open(self) -> bool:
        """Whether the store, audit log or hub client is held open."""
        return any(r is not None for r in (self._store, self._audit, self._hub))

    def close(self) -> None:
        """Release the hub client, the audit log and the store (in that order); idempotent."""
        hub, audit, store = self._hub, self._audit, self._store
        self._hub = self._audit = self._store = None
        try:
            if hub is not None:
                hub.close()
        finally:
            try:
                if audit is not None:
                    audit.close()
            finally:
                if store is not None:
                    store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _record(self, action: str, resource: str, details: dict[str, Any] | None = None) -> None:
        self.audit.append(action, actor=self.name, resource=resource, details=details)

    # -- operations ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Resource counts per type, patients, the last sync and the sync cursors."""
        return {"name": self.name, **self.store.status()}

    def approve(self, study: str, *, epsilon: float | None = None) -> Approval:
        """Pin the hub's study at its verified digest and set its share of the site's ε
        (default: the study's privacy.epsilon); audited as study.approve."""
        from aipipe.privacy.ledger import BudgetLedger  # imports torch: only when needed

        store = self.store
        info = self.hub.study(study)
        spec = StudySpec.model_validate(info.spec)
        if spec.digest() != info.digest:
            raise ConfigError(f"study '{study}' from the hub does not match its digest")
        budget = epsilon if epsilon is not None else spec.privacy.epsilon
        store.approve(spec.name, info.digest, json.dumps(info.spec))
        if spec.privacy.mode == "dp":
            BudgetLedger(store.db).set_budget(spec.name, epsilon=budget, delta=spec.privacy.delta)
        self._record(
            Action.STUDY_APPROVE,
            f"study/{spec.name}",
            {"digest": info.digest, "epsilon_budget": budget},
        )
        return Approval(spec.name, info.digest, budget, spec.columns())

    def set_site_budget(self, *, epsilon: float, delta: float) -> float:
        """Set the site's total (ε, δ) over all studies; return the ε already spent. Audited as
        privacy.site_budget."""
        from aipipe.privacy.ledger import BudgetLedger  # imports torch: only when needed

        ledger = BudgetLedger(self.store.db)
        ledger.set_site_budget(epsilon=epsilon, delta=delta)
        spent = ledger.site_spent()
        details = {"epsilon_budget": epsilon, "delta": delta, "spent": spent}
        self._record("privacy.site_budget", f"node/{self.name}", details)
        return spent

    def approved_spec(self, study: str) -> StudySpec:
        """The study as approved here (ConfigError, saying to approve it, when it is not)."""
        approval = self.store.approval(study)
        if approval is None:
            raise ConfigError(f"study '{study}' is not approved here; run: aipipe node approve")
        return StudySpec.model_validate(json.loads(approval[1]))

    def ingest_files(self, paths: list[Path], on_bytes: Progress | None = None) -> IngestReport:
        """Load FHIR NDJSON/Bundle files (directories expanded); audited as ingest. Needs no hub."""
        report = ingest.ingest_files(self.store, paths, on_bytes)
        return self._ingested(report)

    def ingest_server(
        self,
        url: str,
        *,
        since: str | None = None,
        page_size: int = 100,
        types: list[str],
        on_resource: Callable[[str], None] | None = None,
    ) -> IngestReport:
        """Pull from a FHIR R4 server (SMART auth when configured), each type from its cursor
        or `since`; audited as ingest."""
        with self.fhir_source(url, page_size=page_size) as source:
            report = ingest.ingest_server(
                self.store,
                source,
                source_key=url.rstrip("/"),
                resource_types=[t.strip() for t in types if t.strip()],
                since=since,
                on_resource=on_resource,
            )
        return self._ingested(report)

    def _ingested(self, report: IngestReport) -> IngestReport:
        details = {"files": report.files, **report.to_dict()["totals"]}
        self._record(Action.INGEST, report.source, details)
        return report

    def fhir_source(self, url: str, *, page_size: int = 100) -> FhirServerSource:
        """A client of the FHIR server at `url`, with this node's SMART key if it has one."""
        config, key = self.paths.config, self.paths.smart_key
        auth = (
            smart_auth_for(url, config.smart_client_id, key, at_rest=self.paths.at_rest)
            if config.smart_client_id
            else None
        )
        return FhirServerSource(base_url=url, page_size=page_size, auth=auth)

    def extract(self, study: StudySpec | str) -> FeatureMatrix:
        """The feature matrix of an approved study (by name) or of a study file's spec (to look
        at before approving); audited as features.extract (counts only), as the worker does."""
        from aipipe.node.extraction import audited_extract  # imports scikit-learn

        spec = self.approved_spec(study) if isinstance(study, str) else study
        approval, digest = self.store.approval(spec.name), spec.digest()
        approved = approval is not None and approval[0] == digest
        details = {"digest": digest, "approved": approved}
        return audited_extract(self.store, self.audit, self.name, spec, details)

    def predict(
        self, study: str, *, as_of: date | None = None, write_back_to: str | None = None
    ) -> Scores:
        """Score this site's patients with the study's current model (the site's personal
        model when the study personalizes), once it meets the study's validation minimum
        here, else the newest earlier version of its lineage that does (`Scores.current` and
        `passed_over` then say so); with `write_back_to` (a FHIR base URL) write each score as
        a RiskAssessment. Audited as predict (or writeback), and the gate as its own event."""
        from aipipe.node.personal import personalizes, served_personal
        from aipipe.node.predict import predict_cohort  # imports torch
        from aipipe.node.predict import write_back as send
        from aipipe.node.validation import serve_current
        from aipipe.wire.tensors import decode_arrays

        spec = self.approved_spec(study)
        use = "writeback" if write_back_to else "predict"
        if personalizes(spec):  # the site's own model, chosen on validation, gated on test
            mine = served_personal(self.store, spec, audit=self.audit, actor=self.name, use=use)
            weights, version, current, over = mine.weights, mine.label, None, []
        else:
            served = serve_current(self.store, self.hub, spec, audit=self.audit, actor=self.name,
                                   use=use)  # fmt: skip
            weights, version = decode_arrays(served.weights), served.version
            current, over = served.current, served.passed_over
        predictions = predict_cohort(
            self.store, spec, weights, version, now=datetime.now(UTC), as_of=as_of
        )
        written = 0
        if write_back_to:
            with self.fhir_source(write_back_to) as server:
                written = send(server, predictions)
        scores = Scores(study, version, predictions, written, current, over)
        older = {"current": current} if scores.older_than_current else {}
        self._record(use, f"study/{study}", {
            "model": version, "scored": len(scores.scored), "written": written,
            "as_of": as_of.isoformat() if as_of else "now", **older,
        })  # fmt: skip
        return scores

    def cds_app(
        self,
        studies: list[str],
        *,
        jwt: JwtPolicy | None,
        fhir: FhirAccess | None = None,
        allow_unauthenticated: bool = False,
        link_lifetime_s: float,
    ) -> FastAPI:
        """The CDS Hooks app that `serve-cds` serves: each study gated by its validation minimum
        (audited), each CDS call audited under pseudonyms in this node's log."""
        from aipipe.cds.links import load_link_key
        from aipipe.node.cds import node_cds_app  # imports torch: only when needed

        store, audit, at_rest = self.store, self.audit, self.paths.at_rest
        return node_cds_app(store, self.hub, studies, audit, jwt=jwt, fhir=fhir,
                            allow_unauthenticated=allow_unauthenticated, actor=self.name,
                            pseudonym_key=store.pseudonym_key,
                            link_key=load_link_key(self.paths.cds_link_key, at_rest=at_rest),
                            link_lifetime_s=link_lifetime_s)  # fmt: skip

    def worker(self, log: Log, attack: Attack | None = None) -> NodeWorker:
        """The worker that does the hub's work items for this node (poisoning its updates with
        `attack`: the test/benchmark harness of `aipipe.attacks`, never a study's setting)."""
        from aipipe.node.worker import NodeWorker  # imports torch: only when needed

        store, audit = self.store, self.audit
        return NodeWorker(
            self.name,
            store,
            self.hub,
            self.identity,
            audit,
            allow_non_private=self.paths.config.allow_non_private,
            vault=self.vault,
            log=log,
            attack=attack,
        )

    def daemon(
        self, log: Log, *, poll_wait_s: float = 10.0, attack: Attack | None = None
    ) -> Daemon:
        """The daemon that long-polls the hub and runs `worker`, until stopped."""
        from aipipe.node.client_cert import Renewer
        from aipipe.node.daemon import Daemon  # imports torch: only when needed

        renew = Renewer(self.paths, self.hub).check
        return Daemon(self.worker(log, attack), log, poll_wait_s=poll_wait_s, renew=renew)
