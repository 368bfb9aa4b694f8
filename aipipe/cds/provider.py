"""What the CDS router serves: a `CdsProvider` lists services and hands out scorers.

The hub builds a provider from its model registry (latest version of each published study), a
node from its own personalized model; `StaticCdsProvider` covers the simple case of a fixed set
of models. One `ServiceEntry` per study × hook, with the id `<study>-<hook>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aipipe.cds.cards import ModelSource
from aipipe.cds.models import HOOKS, Hook, ServiceDescriptor
from aipipe.cds.prefetch import prefetch_templates
from aipipe.cds.scoring import PatientScorer
from aipipe.study.cds import CdsSettings
from aipipe.study.spec import StudySpec

_HOOK_WORDS = {
    "patient-view": "when a patient's chart is opened",
    "order-select": "when an order is selected",
    "medication-prescribe": (
        "when a medication is prescribed (a deprecated hook: prefer order-select)"
    ),
}


@dataclass(frozen=True)
class LineageStep:
    """One model version of a lineage, as the server knows it (newest first in a list)."""

    version: str
    round: int | None = None
    parent: str | None = None
    aggregator: str | None = None
    created_at: str | None = None
    sites: int | None = None  # how many sites contributed to the round, where known
    validation: Mapping[str, Any] | None = None  # `ValidationReport.as_card()`, where known
    personal: Mapping[str, Any] | None = None  # a site's personal model: what it is, how chosen


@dataclass(frozen=True)
class ServiceEntry:
    """One CDS service: a study's model answering one hook. `lineage` is the model version's
    and its ancestors' (newest first, starting with `model_version`), for the model card;
    `served_by` says where the service runs ("hub" or "node")."""

    id: str
    hook: Hook
    study: StudySpec
    model_version: str
    title: str
    description: str
    prefetch: Mapping[str, str]
    settings: CdsSettings = field(default_factory=CdsSettings)
    model_url: str | None = None
    lineage: tuple[LineageStep, ...] = ()
    served_by: str = "node"

    def descriptor(self) -> ServiceDescriptor:
        return ServiceDescriptor(
            hook=self.hook,
            title=self.title,
            description=self.description,
            id=self.id,
            prefetch=dict(self.prefetch),
        )

    def source(self) -> ModelSource:
        return ModelSource.for_study(self.study, self.model_version, self.settings, self.model_url)


def service_entries(
    study: StudySpec,
    model_version: str,
    *,
    settings: CdsSettings | None = None,
    model_url: str | None = None,
    hooks: Sequence[Hook] = HOOKS,
    lineage: Sequence[LineageStep] = (),
    served_by: str = "node",
) -> list[ServiceEntry]:
    """The services of one study's model version, one per hook; `settings` default to the
    study's `cds:` block."""
    chosen = settings or study.cds_settings()
    label = chosen.outcome_label or study.outcome_display()
    steps = tuple(lineage) or (LineageStep(model_version),)
    templates = prefetch_templates(study)
    return [
        ServiceEntry(
            id=f"{study.name}-{hook}",
            hook=hook,
            study=study,
            model_version=model_version,
            title=chosen.title or f"{label} risk",
            description=(
                f"Risk of {label} from the federated model of study '{study.name}' "
                f"(version {model_version[:12]}), {_HOOK_WORDS[hook]}."
            ),
            prefetch=templates,
            settings=chosen,
            model_url=model_url,
            lineage=steps,
            served_by=served_by,
        )
        for hook in hooks
    ]


class CdsProvider(Protocol):
    """The services to publish and their scorers; called on every request, so keep it cheap."""

    def services(self) -> Sequence[ServiceEntry]: ...

    def scorer(self, service_id: str) -> PatientScorer | None: ...


class AuditSink(Protocol):
    """Where CDS calls are recorded; `aipipe.audit.log.AuditLog` is one. The router calls it
    from a worker thread (an append waits on disk), so it must be thread-safe."""

    def append(
        self,
        action: str,
        *,
        actor: str,
        resource: str,
        outcome: str,
        details: Mapping[str, Any] | None,
    ) -> object: ...


class StaticCdsProvider:
    """A fixed set of scorers, each published on every hook (tests, benchmarks, a node)."""

    def __init__(
        self,
        scorers: Sequence[PatientScorer],
        *,
        settings: Mapping[str, CdsSettings] | None = None,
        model_urls: Mapping[str, str] | None = None,
        lineages: Mapping[str, Sequence[LineageStep]] | None = None,
        served_by: str = "node",
    ) -> None:
        self._entries: list[ServiceEntry] = []
        self._scorers: dict[str, PatientScorer] = {}
        for scorer in scorers:
            name = scorer.study.name
            entries = service_entries(
                scorer.study,
                scorer.model_version,
                settings=(settings or {}).get(name),
                model_url=(model_urls or {}).get(name),
                lineage=(lineages or {}).get(name, ()),
                served_by=served_by,
            )
            self._entries.extend(entries)
            self._scorers.update({entry.id: scorer for entry in entries})

    def services(self) -> Sequence[ServiceEntry]:
        return self._entries

    def scorer(self, service_id: str) -> PatientScorer | None:
        return self._scorers.get(service_id)
