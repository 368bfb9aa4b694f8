"""`aipipe node serve-cds`: the CDS Hooks service inside the hospital, for deployments that keep
PHI on site. It serves the study's current federated model with this site's own preprocessing
(or, when that misses the study's validation minimum here, the newest earlier version of its
lineage that meets it: `aipipe.node.validation`; its card and model card name that version), or,
when the study personalizes, the site's personal model (`aipipe.node.personal`; the hub's own
CDS keeps the global one); CDS calls land in the node's audit log under pseudonyms."""

from __future__ import annotations

import dataclasses
import json

from fastapi import FastAPI

from aipipe import __version__
from aipipe.audit.log import AuditLog
from aipipe.cds import (
    FhirAccess,
    JwtPolicy,
    LineageStep,
    PatientScorer,
    StaticCdsProvider,
    cds_router,
)
from aipipe.cds.links import DEFAULT_LIFETIME_S
from aipipe.errors import AipipeError, ConfigError
from aipipe.node.client import HubClient
from aipipe.node.personal import StoredPersonal, personalizes, served_personal
from aipipe.node.validation import serve_current
from aipipe.store.node_store import NodeStore
from aipipe.study.features import site_preprocessor
from aipipe.study.spec import StudySpec
from aipipe.wire.tensors import decode_arrays


def node_cds_app(
    store: NodeStore,
    client: HubClient,
    studies: list[str],
    audit: AuditLog,
    *,
    pseudonym_key: bytes,
    jwt: JwtPolicy | None,
    fhir: FhirAccess | None = None,
    allow_unauthenticated: bool = False,
    link_key: bytes | None = None,
    link_lifetime_s: float = DEFAULT_LIFETIME_S,
    actor: str = "node",
) -> FastAPI:
    """The node's CDS app; `link_key` (the home's cds-link.key) signs the model card links."""
    scorers, lineages = [], {}
    for name in studies:
        approval = store.approval(name)
        if approval is None:
            raise ConfigError(f"study '{name}' is not approved here; run: aipipe node approve")
        spec = StudySpec.model_validate(json.loads(approval[1]))
        if personalizes(spec):  # the site's own model: chosen on validation, gated on test
            mine = served_personal(store, spec, audit=audit, actor=actor, use="cds")
            scorers.append(PatientScorer(spec, mine.weights, site_preprocessor(store, spec),
                                         mine.label))  # fmt: skip
            lineages[name] = [personal_step(mine), *hub_lineage(client, name, mine.version)]
            continue
        # Served only if this site's held-out patients meet the study's validation minimum:
        # the current version, else the newest earlier one of its lineage that does.
        served = serve_current(store, client, spec, audit=audit, actor=actor, use="cds")
        version, report, weights = served.version, served.report, decode_arrays(served.weights)
        # A site that cannot scale the inputs still serves: each card then says why no score.
        scorers.append(PatientScorer(spec, weights, site_preprocessor(store, spec), version))
        head, *older = hub_lineage(client, name, version)
        if report is not None:  # the node's own exact validation, shown inside the hospital
            head = dataclasses.replace(head, validation=report.as_card())
        lineages[name] = [head, *older]
    app = FastAPI(title="aipipe node CDS Hooks", version=__version__)
    provider = StaticCdsProvider(scorers, lineages=lineages, served_by="node")
    app.include_router(cds_router(provider, audit=audit, jwt=jwt,
                                  pseudonym_key=pseudonym_key, fhir=fhir,
                                  allow_unauthenticated=allow_unauthenticated,
                                  link_key=link_key, link_lifetime_s=link_lifetime_s))  # fmt: skip
    return app


def personal_step(mine: StoredPersonal) -> LineageStep:
    """A site's personal model as the head of its lineage: its parent is the global version it
    was derived from; its validation is the node's own, on this site's test split."""
    return LineageStep(
        version=mine.label, round=mine.round, parent=mine.version,
        aggregator=f"personal:{mine.method}", created_at=mine.created,
        validation=mine.report, personal=mine.describe(),
    )  # fmt: skip


def hub_lineage(client: HubClient, study: str, version: str) -> list[LineageStep]:
    """`version` and its ancestors as the hub lists them to this node (newest first); only the
    version itself when the hub cannot be asked."""
    try:
        rows = {str(m["version"]): m for m in client.models(study)}
    except AipipeError:
        rows = {}
    steps: list[LineageStep] = []
    current: str | None = version
    while current is not None and len(steps) <= len(rows):
        row = rows.get(current)
        if row is None:
            break
        steps.append(LineageStep(
            version=current, round=row.get("round"), parent=row.get("parent"),
            aggregator=row.get("aggregator"), created_at=row.get("created_at"),
            sites=len(row.get("contributors") or []) or None,
        ))  # fmt: skip
        current = row.get("parent")
    return steps or [LineageStep(version)]
