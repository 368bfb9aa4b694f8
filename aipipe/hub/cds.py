"""The hub's CDS Hooks provider: the current model version of every study that has closed a
round, scored with the sites' pooled train preprocessing (`pooled_preprocessor`).

Scorers are built once per (study, version) and rebuilt when a new round closes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aipipe.cds import FhirAccess, PatientScorer, ServiceEntry, service_entries
from aipipe.errors import ConfigError, StudyError
from aipipe.hub.home import HubPaths
from aipipe.hub.service import HubService
from aipipe.study.features import Preprocessor
from aipipe.wire.tensors import decode_arrays


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
    """The sites' train preprocessing pooled, to score patients at the hub."""
    parts = [
        (
            int(s["n"]),
            Preprocessor(
                {int(c): float(v) for c, v in s["fills"].items()},
                None if s["mean"] is None else np.asarray(s["mean"], np.float64),
                None if s["std"] is None else np.asarray(s["std"], np.float64),
            ),
        )
        for s in service.store.feature_stats(study, service.study_info(study).digest)
    ]
    return Preprocessor.pooled(parts)


class HubCdsProvider:
    def __init__(self, service: HubService) -> None:
        self._service = service
        self._built: dict[str, tuple[str, list[ServiceEntry], PatientScorer]] = {}

    def _refresh(self) -> None:
        for row in self._service.store.studies():
            study, version = str(row["name"]), row["current_version"]
            model = self._service.store.model(version) if version else None
            if model is None or model["round"] == 0:
                continue  # nothing trained yet: the initial weights serve no patient
            if study in self._built and self._built[study][0] == version:
                continue
            spec = self._service.spec(study)
            try:
                preprocessor = pooled_preprocessor(self._service, study)
            except StudyError:
                continue  # no site has reported its preprocessing yet
            weights = decode_arrays(self._service.models.weights(version))
            scorer = PatientScorer(spec, weights, preprocessor, version)
            self._built[study] = (version, service_entries(spec, version), scorer)

    def services(self) -> Sequence[ServiceEntry]:
        self._refresh()
        return [entry for _, entries, _ in self._built.values() for entry in entries]

    def scorer(self, service_id: str) -> PatientScorer | None:
        self._refresh()
        for _, entries, scorer in self._built.values():
            if any(entry.id == service_id for entry in entries):
                return scorer
        return None
