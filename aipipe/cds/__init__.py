"""CDS Hooks 2.0 services for study models: discovery, risk cards, RiskAssessment suggestions.

Mount `cds_router(provider, audit=..., jwt=..., pseudonym_key=...)` in a FastAPI app; build the
provider from scorers (`PatientScorer`) of published model versions. A study's `cds:` block
(`CdsSettings`) words and grades its cards; each card links to its version's `ModelCard`.
"""

from aipipe.cds.auth import CdsClient, JtiStore, JwtPolicy, MemoryJtiStore
from aipipe.cds.cards import (
    ModelSource,
    build_cards,
    build_risk_assessment,
    risk_level,
    unscored_card,
)
from aipipe.cds.fhir_access import FhirAccess
from aipipe.cds.model_card import ModelCard, model_card
from aipipe.cds.models import (
    Card,
    CdsRequest,
    CdsResponse,
    Coding,
    Discovery,
    Feedback,
    FeedbackRequest,
    ServiceDescriptor,
)
from aipipe.cds.prefetch import prefetch_templates, render_template
from aipipe.cds.provider import (
    AuditSink,
    CdsProvider,
    LineageStep,
    ServiceEntry,
    StaticCdsProvider,
    service_entries,
)
from aipipe.cds.scoring import Driver, FeatureValue, MissingFeature, PatientScorer, ScoreResult
from aipipe.cds.service import cds_router
from aipipe.study.cds import CdsSettings

__all__ = [
    "AuditSink",
    "Card",
    "CdsClient",
    "CdsProvider",
    "CdsRequest",
    "CdsResponse",
    "CdsSettings",
    "Coding",
    "Discovery",
    "Driver",
    "FeatureValue",
    "Feedback",
    "FeedbackRequest",
    "FhirAccess",
    "JtiStore",
    "JwtPolicy",
    "LineageStep",
    "MemoryJtiStore",
    "MissingFeature",
    "ModelCard",
    "ModelSource",
    "PatientScorer",
    "ScoreResult",
    "ServiceDescriptor",
    "ServiceEntry",
    "StaticCdsProvider",
    "build_cards",
    "build_risk_assessment",
    "cds_router",
    "model_card",
    "prefetch_templates",
    "render_template",
    "risk_level",
    "service_entries",
    "unscored_card",
]
