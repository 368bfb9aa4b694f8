"""CDS Hooks 2.0 services for study models: discovery, risk cards, RiskAssessment suggestions.

Mount `cds_router(provider, audit=..., jwt=..., pseudonym_key=...)` in a FastAPI app; build the
provider from scorers (`PatientScorer`) of published model versions.
"""

from aipipe.cds.auth import CdsClient, JtiStore, JwtPolicy, MemoryJtiStore
from aipipe.cds.cards import (
    CdsSettings,
    ModelSource,
    build_cards,
    build_risk_assessment,
    risk_level,
    unscored_card,
)
from aipipe.cds.fhir_access import FhirAccess
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
    ServiceEntry,
    StaticCdsProvider,
    service_entries,
)
from aipipe.cds.scoring import Driver, FeatureValue, MissingFeature, PatientScorer, ScoreResult
from aipipe.cds.service import cds_router

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
    "MemoryJtiStore",
    "MissingFeature",
    "ModelSource",
    "PatientScorer",
    "ScoreResult",
    "ServiceDescriptor",
    "ServiceEntry",
    "StaticCdsProvider",
    "build_cards",
    "build_risk_assessment",
    "cds_router",
    "prefetch_templates",
    "render_template",
    "risk_level",
    "service_entries",
    "unscored_card",
]
