"""The hub's logic, free of HTTP: enrolment, studies, and scheduling rounds.

How a round runs — what a node is asked, what an upload does, when the round closes and how
its sum becomes the next model — is its protocol's (`aipipe.hub.rounds`), picked by the study's
`secure:`. `tick()` runs every protocol's deadline checks and finishes any round left in
`aggregating` by a crash, so a hub restarted after SIGKILL picks its rounds up from the store.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from typing import Any, NoReturn

from pydantic import ValidationError

from aipipe.aggregation import AggregationError, aggregator_for
from aipipe.audit.log import AuditLog
from aipipe.errors import (
    AipipeError,
    AuthError,
    ConflictError,
    NotFoundError,
    StudyError,
)
from aipipe.hub.access import Access
from aipipe.hub.client_certs import ClientCerts
from aipipe.hub.enrolment import refusal
from aipipe.hub.home import HubPaths
from aipipe.hub.metrics import HubMetrics
from aipipe.hub.models import ModelRegistry, version_id
from aipipe.hub.people import People
from aipipe.hub.principal import Principal
from aipipe.hub.rounds.context import NodeStatus, RoundContext
from aipipe.hub.rounds.protocol import RoundProtocol
from aipipe.hub.rounds.registry import Protocols
from aipipe.hub.secure import SecureRounds
from aipipe.hub.validation import check_report
from aipipe.personalization.parts import initial_weights
from aipipe.secure.identity import Identity
from aipipe.store.hub_rounds import RoundRow
from aipipe.store.hub_store import HubStore
from aipipe.store.secure_store import SecureStore
from aipipe.study.spec import StudySpec
from aipipe.wire import (
    EnrolRequest,
    EnrolResponse,
    EvalReport,
    EvaluateWork,
    FeatureStats,
    IdleWork,
    RoundInfo,
    RoundState,
    RoundWork,
    StudyInfo,
    UpdateReceipt,
    WorkItem,
)
from aipipe.wire.tensors import encode_arrays


class HubService:
    def __init__(
        self,
        paths: HubPaths,
        store: HubStore,
        audit: AuditLog,
        identity: Identity,
        metrics: HubMetrics | None = None,
    ):
        self.paths = paths
        self.store = store
        self.audit = audit
        self.identity = identity
        self.models = ModelRegistry(store, audit)
        secure = SecureStore(store.conn)
        self.metrics = metrics or HubMetrics()
        self._rounds = RoundContext(
            store, secure, audit, self.models, self.spec, metrics=self.metrics
        )
        self.protocols = Protocols(self._rounds)
        self.secure = SecureRounds(store, self._rounds.secure, self.protocols)
        self.access = Access(self._rounds, self)
        self.client_certs = ClientCerts(paths, audit)
        self.people = People(store, audit, issuer=f"aipipe {paths.config.name}")
        self._specs: dict[str, StudySpec] = {}

    # -- auth and enrolment ------------------------------------------------------------------

    def authenticate(self, bearer: str | None) -> Principal:
        """Who holds `bearer`: a person's or a service's API token (`aipipe.hub.people`), or a
        node's credential. A refusal is audited `auth.failure` with its reason, not the token."""
        if not bearer:
            self._auth_failure("missing")
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        person = self.people.authenticate(bearer)
        if person is not None:
            return person
        node = self.store.node_for_credential(bearer)
        if node is None or node["state"] != "active":
            self._auth_failure("unknown" if node is None else "node-revoked")
            raise AuthError("unknown or revoked token")
        self.store.touch_node(node["name"])
        return Principal("node", str(node["name"]))

    def _auth_failure(self, reason: str) -> None:
        self.audit.append(
            "auth.failure", actor="unknown", outcome="failure", details={"reason": reason}
        )

    def audit_refusal(self, who: Principal, method: str, path: str, reason: str) -> None:
        """An authenticated caller refused by its role (`aipipe.hub.roles.Allow`)."""
        self.audit.append(
            "auth.refused",
            actor=f"{who.kind}/{who.name}",
            resource=f"{method} {path}",
            outcome="refused",
            details={"reason": reason},
        )

    def enrol(self, request: EnrolRequest) -> EnrolResponse:
        credential = secrets.token_urlsafe(32)
        sealing = self.secure.checked_sealing_key(request)  # before the one-time token is spent
        csr = self.client_certs.check(request.node, request.client_csr, "enrolment")
        done = self.store.enrol(request.node, request.secret, request.public_key, credential)
        if done.status not in ("enrolled", "re-enrolled"):
            reason, error = refusal(request.node, done)
            self.audit.append(
                "enrolment",
                actor=request.node,
                resource=f"node/{request.node}",
                outcome="refused",
                details={"reason": reason},
            )
            raise error
        if sealing is not None:
            self.secure.store.set_sealing_key(request.node, *sealing)
        details = {"public_key": request.public_key}
        if done.previous_key is not None:  # an admin issued this token with --replace
            details["previous_public_key"] = done.previous_key
        self.audit.append(
            "node.re_enrolled" if done.status == "re-enrolled" else "enrolment",
            actor=request.node,
            resource=f"node/{request.node}",
            details=details,
        )
        return EnrolResponse(
            node=request.node,
            credential=credential,
            hub_public_key=self.identity.public_hex,
            client_cert=self.client_certs.issue(request.node, csr, "enrol"),
        )

    # -- studies -----------------------------------------------------------------------------

    def publish(self, raw_spec: dict[str, Any], actor: str = "admin") -> StudyInfo:
        try:
            spec = StudySpec.model_validate(raw_spec)
        except ValidationError as exc:
            raise StudyError(f"invalid study: {exc.errors()[0]['msg']}") from exc
        if self.store.study(spec.name) is not None:
            raise ConflictError(f"study '{spec.name}' is already published; give a new name")
        self.protocols.for_spec(spec).check_spec(spec)
        try:
            aggregator_for(spec.aggregation, spec.training.proximal_mu).check_round_size(
                spec.min_nodes
            )
        except AggregationError as exc:
            raise StudyError(f"study '{spec.name}': {exc}") from exc
        arrays = initial_weights(spec)  # every tensor; only the shared ones ever change
        blob = self.store.put_blob(encode_arrays(arrays))
        version = version_id(spec.name, 0, None, blob)
        self.store.add_model(
            version,
            spec.name,
            0,
            None,
            "init",
            blob,
            {"study": spec.name, "round": 0, "contributors": []},
        )
        self.store.add_study(spec.name, spec.digest(), spec.model_dump(mode="json"), version)
        self.audit.append(
            "admin",
            actor=actor,
            resource=f"study/{spec.name}",
            details={"op": "publish", "digest": spec.digest()},
        )
        return self.study_info(spec.name)

    def spec(self, name: str) -> StudySpec:
        """A published study; parsed once, since a published study never changes (every work
        long-poll asks for it)."""
        spec = self._specs.get(name)
        if spec is None:
            row = self.store.study(name)
            if row is None:
                raise NotFoundError(f"no study '{name}' on this hub; publish it first")
            spec = self._specs[name] = StudySpec.model_validate(json.loads(row["spec"]))
        return spec

    def study_info(self, name: str) -> StudyInfo:
        row = self.store.study(name)
        if row is None:
            raise NotFoundError(f"no study '{name}' on this hub; publish it first")
        closed = sum(1 for r in self.store.rounds(name) if r.state == RoundState.CLOSED)
        return StudyInfo(
            name=name,
            digest=row["digest"],
            spec=json.loads(row["spec"]),
            published_at=row["published_at"],
            current_version=row["current_version"],
            rounds_closed=closed,
        )

    # -- rounds ------------------------------------------------------------------------------

    def _protocol(self, study: str) -> tuple[StudySpec, RoundProtocol]:
        spec = self.spec(study)
        return spec, self.protocols.for_spec(spec)

    def open_round(self, study: str, deadline_s: float | None, actor: str = "admin") -> RoundInfo:
        spec, protocol = self._protocol(study)
        active = self.store.active_round(study)
        if active is not None:
            raise ConflictError(f"round {active.round} of '{study}' is still {active.state}")
        selected = protocol.eligible(spec, self.store.eligible_nodes(study))
        if len(selected) < spec.min_nodes:
            raise ConflictError(
                f"study '{study}' needs {spec.min_nodes} nodes but {len(selected)} are eligible; "
                "enrol more nodes"
            )
        base = self.study_info(study).current_version
        assert base is not None
        clock = self._rounds.clock
        deadline = clock.now() + timedelta(seconds=deadline_s or spec.round_deadline_s)
        number = self.store.open_round(study, base, clock.iso(deadline), selected)
        protocol.open(spec, number)
        self.audit.append(
            "admin",
            actor=actor,
            resource=f"study/{study}/round/{number}",
            details={"op": "open-round", "selected": len(selected)},
        )
        return self.round_info(study, number)

    def round_info(self, study: str, number: int) -> RoundInfo:
        row = self.store.round(study, number)
        if row is None:
            raise NotFoundError(f"study '{study}' has no round {number}")
        statuses = self._rounds.statuses(study, number)
        nodes = self.store.round_nodes(study, number)
        return RoundInfo(
            study=study,
            round=number,
            state=RoundState(row.state),
            base_version=row.base_version,
            deadline=row.deadline,
            reason=row.reason,
            stage=self._protocol(study)[1].stage(study, number),
            selected=list(statuses),
            reported=[n for n, s in statuses.items() if s is NodeStatus.REPORTED],
            declined={
                n["node"]: n["reason"] or "" for n in nodes if n["status"] == NodeStatus.DECLINED
            },
            result_version=row.result_version,
            metrics=self.store.metrics(row.result_version) if row.result_version else {},
        )

    def work_for(self, node: str, skip: frozenset[str] = frozenset()) -> WorkItem:
        """The node's next work item; studies in `skip` (which it has not approved) offer none."""
        for study_row in self.store.studies():
            study = str(study_row["name"])
            if study in skip:
                continue
            active = self.store.active_round(study)
            item = None if active is None else self._round_work(study_row, active, node)
            if item is not None:
                return item
            current = study_row["current_version"]
            model = self.store.model(current) if current else None
            if (
                model is not None
                and model["round"] > 0
                and not self.store.has_metrics(current, node)
                and self.store.takes_part(study, node)
            ):
                return EvaluateWork(
                    study=study,
                    study_digest=study_row["digest"],
                    round=model["round"],
                    version=current,
                )
        return IdleWork()

    def _round_work(self, study_row: Any, active: RoundRow, node: str) -> RoundWork | None:
        status = self.store.node_status(active.study, active.round, node)
        if status == NodeStatus.DECLINED:
            return None  # not re-offered: a secure round's stages would ask again and again
        spec, protocol = self._protocol(active.study)
        return protocol.work(spec, active, node, study_row["digest"])

    def refuse_update(self, node: str, study: str, number: int, reason: str) -> NoReturn:
        """Audit and raise the refusal of a body that could not be read as an update."""
        self._rounds.refuse(node, study, number, reason, "malformed")

    def receive_update(self, node: str, study: str, number: int, body: bytes) -> UpdateReceipt:
        spec, protocol = self._protocol(study)
        protocol.accept(spec, node, number, body)
        row = self.store.round(study, number)
        return UpdateReceipt(accepted=True, round_state=row.state if row else "unknown")

    def decline(self, node: str, study: str, number: int, reason: str, exclude: bool) -> None:
        if not self.store.record_decline(study, number, node, reason):
            raise ConflictError(f"node '{node}' has nothing pending in round {number} of '{study}'")
        if exclude:
            self.store.exclude(study, node, reason)
        self.audit.append(
            "update.refused",
            actor=node,
            resource=f"study/{study}/round/{number}",
            outcome="refused",
            details={"declined": reason, "excluded": exclude},
        )
        self._maybe_close(study, number)

    def report_metrics(self, node: str, report: EvalReport) -> None:
        self.access.check_metrics(node, report.version)
        model = self.store.model(report.version)  # there: check_metrics says so
        if model is not None:
            check_report(self.spec(model["study"]), report)
        self.store.add_metrics(
            report.version, node, report.model_dump(mode="json", exclude={"version", "protocol"})
        )

    def report_stats(self, node: str, study: str, stats: FeatureStats) -> None:
        self.access.check_stats(node, study, stats)
        if stats.study_digest != self.study_info(study).digest:
            raise ConflictError(f"statistics are for another version of study '{study}'")
        self.store.put_feature_stats(study, node, stats.study_digest, stats.model_dump(mode="json"))

    # -- closing -----------------------------------------------------------------------------

    def tick(self) -> bool:
        """Deadlines and crash recovery; cheap enough to call every second. True if a round
        changed state."""
        changed = False
        for row in self.store.pending_rounds():
            spec, protocol = self._protocol(row.study)
            try:
                protocol.advance(spec, row.round)
            except AipipeError as exc:
                # One round that cannot go on must not stop the ticker (nor a restart, which
                # ticks first): it fails with the reason, and every other round carries on.
                protocol.fail(row.study, row.round, f"round could not continue: {exc}")
            after = self.store.round(row.study, row.round)
            changed |= after is not None and after.state != row.state
        return changed

    def _maybe_close(self, study: str, number: int) -> None:
        state = self._rounds.state(study, number)
        if state is not None and state.active:
            spec, protocol = self._protocol(study)
            protocol.advance(spec, number)
