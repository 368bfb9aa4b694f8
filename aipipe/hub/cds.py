"""The hub's CDS Hooks provider: the current model version of every study that has closed a
round, scored with the sites' pooled train preprocessing (`HubService.pooled_preprocessor`).

Scorers are built once per (study, version) and rebuilt when a new round closes.
"""

from __future__ import annotations

from collections.abc import Sequence

from aipipe.cds import PatientScorer, ServiceEntry, service_entries
from aipipe.errors import StudyError
from aipipe.hub.service import HubService
from aipipe.wire.tensors import decode_arrays


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
                preprocessor = self._service.pooled_preprocessor(study)
            except StudyError:
                continue  # no site has reported its preprocessing yet
            weights = decode_arrays(self._service.model_weights(version))
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
