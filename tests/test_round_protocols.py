"""Every round kind through the one `RoundProtocol` interface (aipipe.hub.rounds).

The hub is set up over HTTP (enrolment, publishing), then driven in this process the way
`HubService` drives it: `open`, `work`, `accept`, `advance`, `finish` — with a fresh
`HubService` over the same store standing in for a restarted hub.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from aipipe.aggregation import Aggregator, aggregator_for
from aipipe.aggregation.base import Weights
from aipipe.audit.log import AuditLog
from aipipe.errors import StudyError, UpdateRejectedError
from aipipe.hub.home import HubPaths
from aipipe.hub.rounds.plain import PlainRound
from aipipe.hub.rounds.registry import PROTOCOLS
from aipipe.hub.rounds.secagg import SecAggRound
from aipipe.hub.service import HubService
from aipipe.secure.identity import Identity
from aipipe.study.spec import StudySpec
from aipipe.wire import WORK_ITEM, EvaluateWork, IdleWork, RoundState, RoundWork, SecureMode
from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import frame, signed_update
from tests.hub_support import STUDY, Arrays, Node, running_hub

SECURE = {"min_nodes": 3, "secure_options": {"stage_timeout_s": 30}}
STUDIES: dict[SecureMode, dict[str, Any]] = {
    SecureMode.NONE: {**STUDY, "name": "plain", "min_nodes": 3},
    SecureMode.SECAGG: {**STUDY, "name": "masked", "secure": "secagg", **SECURE},
    SecureMode.CKKS: {**STUDY, "name": "sealed", "secure": "ckks", **SECURE},
}


@dataclass(frozen=True)
class Site:
    paths: HubPaths
    nodes: list[Node]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    with running_hub(tmp_path / "hub") as hub:
        nodes = [hub.enrol(name) for name in ("alpha", "bravo", "charlie")]
        for raw in STUDIES.values():
            hub.publish(raw)
        return Site(hub.paths, nodes)


@contextmanager
def service_of(site: Site) -> Iterator[HubService]:
    """The hub's service over its home, as a (re)started hub builds it, with no ticker."""
    identity = Identity.load(site.paths.identity_key)
    store = site.paths.open_store()
    audit = AuditLog.open(site.paths.audit_log, identity)
    try:
        yield HubService(site.paths, store, audit, identity)
    finally:
        audit.close()
        store.close()


def delta_of(base: Arrays, scale: float) -> Arrays:
    return {k: np.full(v.shape, scale, dtype=np.float32) for k, v in base.items()}


def body(service: HubService, node: Node, study: str, number: int, delta: Arrays, n: int) -> bytes:
    row = service.store.round(study, number)
    assert row is not None
    header, payload = signed_update(
        node.identity,
        node=node.name,
        study=study,
        study_digest=service.study_info(study).digest,
        round=number,
        base_version=row.base_version,
        delta=delta,
        num_examples=n,
    )
    return frame(header, payload)


def base_of(service: HubService, study: str, number: int) -> Arrays:
    row = service.store.round(study, number)
    assert row is not None
    return decode_arrays(service.models.weights(row.base_version))


def result_of(service: HubService, study: str, number: int) -> Arrays:
    row = service.store.round(study, number)
    assert row is not None and row.state == RoundState.CLOSED, row
    assert row.result_version is not None
    return decode_arrays(service.models.weights(row.result_version))


# -- the registry --------------------------------------------------------------------------------


def test_every_secure_mode_has_one_round_protocol_registered_under_it() -> None:
    assert set(PROTOCOLS) == set(SecureMode)
    assert all(cls.mode is mode for mode, cls in PROTOCOLS.items())


@pytest.mark.parametrize("mode", list(SecureMode))
def test_a_study_is_run_by_the_protocol_of_its_secure_mode(site: Site, mode: SecureMode) -> None:
    with service_of(site) as service:
        spec = service.spec(STUDIES[mode]["name"])
        assert service.protocols.for_spec(spec).mode is mode


# -- each protocol's first step and its deadline ---------------------------------------------

FIRST_STEP = {SecureMode.NONE: "train", SecureMode.SECAGG: "train", SecureMode.CKKS: "keygen"}


@pytest.mark.parametrize("mode", list(SecureMode))
def test_each_protocol_asks_a_selected_node_for_its_first_step(
    site: Site, mode: SecureMode
) -> None:
    with service_of(site) as service:
        study = STUDIES[mode]["name"]
        number = service.open_round(study, 60).round
        spec = service.spec(study)
        protocol = service.protocols.for_spec(spec)
        row = service.store.round(study, number)
        assert row is not None
        asked = [protocol.work(spec, row, n.name, spec.digest()) for n in site.nodes]
        kinds = [item.kind for item in asked if item is not None]
        # CKKS asks one designated node for the study's keys; the others wait
        assert kinds == ([FIRST_STEP[mode]] if mode is SecureMode.CKKS else ["train"] * 3)
        assert all(i.round == number for i in asked if i is not None)


@pytest.mark.parametrize("mode", list(SecureMode))
def test_each_protocol_fails_a_round_nobody_answered_at_its_deadline_and_audits_why(
    site: Site, mode: SecureMode
) -> None:
    with service_of(site) as service:
        study = STUDIES[mode]["name"]
        number = service.open_round(study, 0.05).round
        spec = service.spec(study)
        time.sleep(0.1)
        service.protocols.for_spec(spec).advance(spec, number)
        row = service.store.round(study, number)
        assert row is not None and row.state == RoundState.FAILED
        assert row.reason
        failures = [e for e in service.audit.events() if e.action == "aggregate"]
        assert failures[-1].outcome == "failure"
        assert failures[-1].details["reason"] == row.reason
        assert service.models.info(service.study_info(study).current_version or "").round == 0


@pytest.mark.parametrize("mode", [SecureMode.SECAGG, SecureMode.CKKS])
def test_a_plaintext_update_handed_to_a_secure_protocol_is_refused_and_audited(
    site: Site, mode: SecureMode
) -> None:
    with service_of(site) as service:
        study = STUDIES[mode]["name"]
        number = service.open_round(study, 60).round
        spec = service.spec(study)
        alpha = site.nodes[0]
        plain = body(
            service, alpha, study, number, delta_of(base_of(service, study, number), 0.1), 5
        )
        with pytest.raises(UpdateRejectedError, match="takes secure"):
            service.protocols.for_spec(spec).accept(spec, alpha.name, number, plain)
        refused = [e for e in service.audit.events() if e.action == "update.refused"]
        assert refused[-1].actor == alpha.name


# -- the plain protocol and the study's aggregator ------------------------------------------------


def test_the_plain_protocol_keeps_the_aggregators_state_so_a_restarted_hub_resumes_the_fold(
    site: Site,
) -> None:
    study, sizes, scales = "plain", (10, 30, 60), (0.1, -0.2, 0.05)
    with service_of(site) as first:
        number = first.open_round(study, 60).round
        base = base_of(first, study, number)
        spec = first.spec(study)
        first.protocols.for_spec(spec).accept(
            spec,
            "alpha",
            number,
            body(first, site.nodes[0], study, number, delta_of(base, 0.1), 10),
        )
    with service_of(site) as restarted:
        row = restarted.store.round(study, number)
        assert row is not None and row.sum_blob is not None
        resumed = aggregator_for(spec.aggregation, spec.training.proximal_mu)
        resumed.set_state(decode_arrays(row.sum_blob))  # the study's aggregator, mid-round
        protocol = restarted.protocols.for_spec(spec)
        for node, n, scale in zip(site.nodes[1:], sizes[1:], scales[1:], strict=True):
            protocol.accept(
                spec,
                node.name,
                number,
                body(restarted, node, study, number, delta_of(base, scale), n),
            )
        model = result_of(restarted, study, number)
    mean = sum(n * s for n, s in zip(sizes, scales, strict=True)) / sum(sizes)
    for key, value in model.items():
        np.testing.assert_allclose(value, base[key] + mean, rtol=1e-5, atol=1e-6)


class CoordinateMedian(Aggregator):
    """A robust aggregator that needs every update on its own: base + the coordinate median."""

    name = "median"
    requires_individual_updates = True

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[Mapping[str, Any]] = []

    def begin(self, global_weights: Mapping[str, Any]) -> None:
        super().begin(global_weights)
        self.updates = []

    def accumulate(self, delta: Mapping[str, Any], num_examples: int) -> None:
        self.updates.append(delta)

    def finalize(self) -> Weights:
        reference = self._open_round()
        return self.server_step(
            dict(reference),
            {k: np.median([u[k] for u in self.updates], axis=0) for k in reference},
        )

    def server_step(self, global_weights: Weights, mean_delta: Weights) -> Weights:
        return {k: global_weights[k] + mean_delta[k] for k in global_weights}


def test_an_aggregator_that_needs_every_update_gets_each_one_kept_on_disk(site: Site) -> None:
    study, scales = "plain", (0.1, 5.0, -0.3)  # one outlier: the median ignores it
    with service_of(site) as service:
        number = service.open_round(study, 60).round
        base, spec = base_of(service, study, number), service.spec(study)
        ctx = replace(service.protocols.for_spec(spec).ctx, aggregator=lambda _: CoordinateMedian())
        protocol = PlainRound(ctx)
        for node, scale in zip(site.nodes, scales, strict=True):
            protocol.accept(
                spec,
                node.name,
                number,
                body(service, node, study, number, delta_of(base, scale), 7),
            )
        kept = [n["payload_sha256"] for n in service.store.round_nodes(study, number)]
        assert all(service.store.blob(sha) for sha in kept)  # each update, content-addressed
        model = result_of(service, study, number)
        row = service.store.round(study, number)
        assert row is not None and row.result_version is not None
        assert service.models.info(row.result_version).aggregator == "median"
    for key, value in model.items():
        np.testing.assert_allclose(value, base[key] + 0.1, rtol=1e-6)


def test_a_secure_protocol_refuses_an_aggregator_that_needs_every_update(site: Site) -> None:
    with service_of(site) as service:
        spec: StudySpec = service.spec("masked")
        ctx = replace(service.protocols.for_spec(spec).ctx, aggregator=lambda _: CoordinateMedian())
        with pytest.raises(StudyError, match="needs every update on its own"):
            SecAggRound(ctx).check_spec(spec)


# -- the work a hub hands out ---------------------------------------------------------------------


def test_a_work_item_carries_exactly_the_fields_its_kind_needs() -> None:
    round_step = {"study": "s", "study_digest": "d" * 64, "round": 1, "version": "v" * 64}
    assert isinstance(WORK_ITEM.validate_python({"kind": "idle"}), IdleWork)
    assert isinstance(WORK_ITEM.validate_python({"kind": "evaluate", **round_step}), EvaluateWork)
    for kind in ("train", "keygen", "decrypt"):
        assert isinstance(WORK_ITEM.validate_python({"kind": kind, **round_step}), RoundWork)
    with pytest.raises(ValidationError):  # a round step names its round and base model
        WORK_ITEM.validate_python({"kind": "train", "study": "s"})
    with pytest.raises(ValidationError):  # nothing to do carries nothing
        WORK_ITEM.validate_python({"kind": "idle", "study": "s"})
