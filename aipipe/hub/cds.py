"""The hub's CDS Hooks provider: the current model version of every study that has closed a
round, scored with the sites' pooled train preprocessing (`pooled_preprocessor`), derived from
their DP-noised sums; a study that releases no statistics, or whose global model alone predicts
nothing (a personalized study, `aipipe.hub.personal`), is served at the nodes only.

Scorers are built once per (study, version) and rebuilt when a new round closes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from aipipe.cds import FhirAccess, LineageStep, PatientScorer, ServiceEntry, service_entries
from aipipe.errors import ConfigError, StudyError
from aipipe.hub.home import HubPaths
from aipipe.hub.personal import withheld_reason
from aipipe.hub.service import HubService
from aipipe.hub.validation import servable_version, validation_card
from aipipe.privacy.statistics import NoisedSums, moments, pool
from aipipe.study.preprocessing import Preprocessor
from aipipe.study.spec import StudySpec
from aipipe.wire.tensors import decode_arrays

Mark = tuple[int, str | None]  # `HubStore.metrics_mark()`


def hub_fhir_access(paths: HubPaths) -> FhirAccess:
    """Which fhirServers CDS requests may have the hub read: hub.yaml's cds_fhir_servers, with
    cds_fhir_ca_bundle (relative to the home) trusted on top of the usual CAs."""
    config = paths.config
    bundle = None if config.cds_fhir_ca_bundle is None else paths.home / config.cds_fhir_ca_bundle
    try:
        return FhirAccess(
            allowed_servers=tuple(config.cds_fhir_servers),
            ca_bundle=None if bundle is None else str(bundle),
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"hub.yaml cds_fhir_ca_bundle {bundle} cannot be loaded ({exc}); give a PEM file "
            "of CA certificates"
        ) from exc


def pooled_preprocessor(service: HubService, study: str) -> Preprocessor:
    """The sites' train preprocessing pooled from their noised sums, to score patients at the
    hub: means and stds for `standardize: site`, and the train mean as the fill of a column
    imputed without a declared value (filling with the mean keeps the column's mean).
    Raises `StudyError` when the study releases no statistics or no site has sent them."""
    spec = service.spec(study)
    ranges = spec.statistics_ranges()
    if ranges is None:
        raise StudyError(
            f"study '{study}' releases no preprocessing statistics to the hub: its CDS is "
            "served at the nodes (`aipipe node serve-cds`)"
        )
    rows = service.store.feature_stats(study, service.study_info(study).digest)
    # Rows stored before statistics were noised (exact mean/std) are not used.
    parts = [NoisedSums(float(r["n"]), r["sums"], r["squares"]) for r in rows if "sums" in r]
    if not parts:
        raise StudyError(f"no site has reported its statistics for study '{study}' yet")
    mean, std = moments(pool(parts), ranges)
    fills = {c: float(mean[c]) if v is None else v for c, v in spec.imputed_columns()}
    if spec.preprocessing.standardize != "site":
        return Preprocessor(fills, None, None)
    return Preprocessor(fills, mean, std)


def registry_lineage(service: HubService, version: str) -> list[LineageStep]:
    """`version` and its ancestors from the hub's model registry, newest first."""
    steps: list[LineageStep] = []
    current: str | None = version
    while current is not None and len(steps) < 10_000:
        row = service.store.model(current)
        if row is None:
            break
        contributors = json.loads(row["lineage"]).get("contributors", [])
        steps.append(
            LineageStep(
                version=current,
                round=int(row["round"]),
                parent=row["parent"],
                aggregator=row["aggregator"],
                created_at=row["created_at"],
                sites=len(contributors) if row["round"] else None,
                validation=validation_card(service.store, current),
            )
        )
        current = row["parent"]
    return steps


class HubCdsProvider:
    def __init__(self, service: HubService) -> None:
        self._service = service
        # study → ((served version, reports mark), its services, its scorer)
        self._built: dict[str, tuple[tuple[str, Mark | None], list[ServiceEntry], PatientScorer]]
        self._built = {}
        # study → ((head version, reports mark), (servable version, why not the head))
        self._decided: dict[str, tuple[tuple[str | None, Mark | None], tuple[str | None, str]]]
        self._decided = {}
        # study → (head version, why the hub's CDS does not serve it)
        self.withheld: dict[str, tuple[str, str]] = {}

    def _refresh(self) -> None:
        """Called on every CDS request: one query for the reports' mark; a study's validation
        decision and services are rebuilt only when its head version changed or, for a study
        with a `validation:` minimum, a report arrived (it may move the pooled metrics)."""
        mark = self._service.store.metrics_mark()
        for row in self._service.store.studies():
            study = str(row["name"])
            spec = self._service.spec(study)
            stamp = mark if spec.validation is not None else None
            version = self._servable(spec, row["current_version"], stamp)
            if version is None:
                continue  # no version meets the study's validation minimum (or none trained)
            model = self._service.store.model(version)
            if model is None or model["round"] == 0:
                continue  # nothing trained yet: the initial weights serve no patient
            if study in self._built and self._built[study][0] == (version, stamp):
                continue
            try:
                preprocessor = pooled_preprocessor(self._service, study)
            except StudyError:
                continue  # no site has reported its preprocessing yet
            weights = decode_arrays(self._service.models.weights(version))
            scorer = PatientScorer(spec, weights, preprocessor, version)
            lineage = registry_lineage(self._service, version)
            entries = service_entries(spec, version, lineage=lineage, served_by="hub")
            self._built[study] = ((version, stamp), entries, scorer)

    def _servable(self, spec: StudySpec, current: str | None, stamp: Mark | None) -> str | None:
        """The newest version meeting the study's `validation:` minimum (the current one when
        it sets none); a study with none is withheld, audited once per head version. Decided
        again only when the head version or the reports (`stamp`) changed."""
        study, kept = spec.name, self._decided.get(spec.name)
        if kept is not None and kept[0] == (current, stamp):
            version, reason = kept[1]
        else:
            personalized = withheld_reason(spec)  # the global model alone predicts nothing
            if personalized is not None:
                version, reason = None, personalized
            else:
                version, reason = servable_version(self._service.store, spec, current)
            self._decided[study] = ((current, stamp), (version, reason))
        if version != current and self.withheld.get(study, ("", ""))[0] != current:
            self.withheld[study] = (str(current), reason)
            self._service.audit.append(
                "cds.withheld",
                actor="hub",
                resource=f"study/{study}",
                outcome="refused" if version is None else "success",
                details={"head": current, "served": version, "reason": reason[:2000]},
            )
        return version

    def services(self) -> Sequence[ServiceEntry]:
        self._refresh()
        return [entry for _, entries, _ in self._built.values() for entry in entries]

    def scorer(self, service_id: str) -> PatientScorer | None:
        self._refresh()
        for _, entries, scorer in self._built.values():
            if any(entry.id == service_id for entry in entries):
                return scorer
        return None
