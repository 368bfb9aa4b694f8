"""CDS Hooks 2.0 wire shapes (https://cds-hooks.hl7.org/2.0/), field names as the spec spells them.

The spec forbids null and empty values for attributes that are not set ("implementers MUST omit
it"), so every response is serialised with `dump()`, which drops unset optionals. Requests are
validated strictly (`extra="forbid"`); the spec reserves `extension` for custom data, so that one
name is accepted everywhere it may appear.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Hook = Literal["patient-view", "order-select", "medication-prescribe"]
HOOKS: tuple[Hook, ...] = ("patient-view", "order-select", "medication-prescribe")

# "One-sentence, <140-character summary message" (Card attributes).
SUMMARY_MAX = 139
# Feedback items in one call: one per card shown; each is one audit event.
MAX_FEEDBACK = 50

NonEmpty = Annotated[str, Field(min_length=1)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def dump(self) -> dict[str, Any]:
        """JSON-ready dict without unset optionals (the spec's "MUST omit")."""
        return self.model_dump(mode="json", exclude_none=True)


class Coding(_Wire):
    """The spec's trimmed-down FHIR Coding (Data Types › Coding)."""

    code: NonEmpty
    system: NonEmpty
    display: str | None = None


# -- discovery ------------------------------------------------------------------------------


class ServiceDescriptor(_Wire):
    hook: NonEmpty
    title: str | None = None
    description: NonEmpty
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    prefetch: dict[str, str] | None = None
    usageRequirements: str | None = None


class Discovery(_Wire):
    services: list[ServiceDescriptor]


# -- request --------------------------------------------------------------------------------


class FhirAuthorization(_Wire):
    access_token: NonEmpty
    token_type: Literal["Bearer", "bearer"]
    expires_in: int = Field(ge=0)
    scope: NonEmpty
    subject: NonEmpty
    patient: str | None = None


class CdsRequest(_Wire):
    hook: NonEmpty
    hookInstance: Annotated[str, Field(min_length=1, max_length=256)]
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    # A value may be null: "If the CDS Client has no data to populate a template prefetch key,
    # the prefetch template key MUST have a value of null."
    prefetch: dict[str, Any] | None = None
    extension: dict[str, Any] | None = None

    @field_validator("fhirServer")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("fhirServer must be an absolute http(s) URL")
        return value

    @model_validator(mode="after")
    def _authorization_needs_server(self) -> CdsRequest:
        # "If fhirAuthorization is provided, this field is REQUIRED."
        if self.fhirAuthorization is not None and self.fhirServer is None:
            raise ValueError("fhirAuthorization is given without fhirServer")
        return self

    def patient_id(self) -> str | None:
        value = self.context.get("patientId")
        return value if isinstance(value, str) and value else None


# -- response -------------------------------------------------------------------------------


class Source(_Wire):
    label: NonEmpty
    url: str | None = None
    icon: str | None = None
    topic: Coding | None = None


class Action(_Wire):
    type: Literal["create", "update", "delete"]
    description: NonEmpty
    resource: dict[str, Any] | None = None
    resourceId: str | None = None

    @model_validator(mode="after")
    def _resource_for_writes(self) -> Action:
        if self.type in ("create", "update") and self.resource is None:
            raise ValueError(f"a '{self.type}' action carries the resource")
        return self


class Suggestion(_Wire):
    label: NonEmpty
    uuid: str | None = None
    isRecommended: bool | None = None
    actions: list[Action] | None = None


class Link(_Wire):
    label: NonEmpty
    url: NonEmpty
    type: Literal["absolute", "smart"]
    appContext: str | None = None

    @model_validator(mode="after")
    def _app_context_for_smart(self) -> Link:
        if self.appContext is not None and self.type != "smart":
            raise ValueError("appContext is only valid for 'smart' links")
        return self


class Card(_Wire):
    uuid: str | None = None
    summary: Annotated[str, Field(min_length=1, max_length=SUMMARY_MAX)]
    detail: str | None = None
    indicator: Literal["info", "warning", "critical"]
    source: Source
    suggestions: list[Suggestion] | None = None
    selectionBehavior: Literal["at-most-one", "any"] | None = None
    overrideReasons: list[Coding] | None = None
    links: list[Link] | None = None

    @model_validator(mode="after")
    def _conditional_fields(self) -> Card:
        # "If suggestions are present, selectionBehavior MUST also be provided."
        if self.suggestions and self.selectionBehavior is None:
            raise ValueError("a card with suggestions needs selectionBehavior")
        # "If override reasons are present, the CDS Service MUST populate a display value".
        if self.overrideReasons and any(not r.display for r in self.overrideReasons):
            raise ValueError("every override reason needs a display")
        return self


class CdsResponse(_Wire):
    cards: list[Card]
    systemActions: list[Action] | None = None


# -- feedback -------------------------------------------------------------------------------


class AcceptedSuggestion(_Wire):
    id: NonEmpty


class OverrideReason(_Wire):
    reason: Coding | None = None
    userComment: str | None = None


class Feedback(_Wire):
    card: NonEmpty
    outcome: Literal["accepted", "overridden"]
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None
    outcomeTimestamp: NonEmpty
    extension: dict[str, Any] | None = None

    @field_validator("outcomeTimestamp")
    @classmethod
    def _iso_instant(cls, value: str) -> str:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("outcomeTimestamp must be an ISO 8601 date and time") from None
        return value

    @model_validator(mode="after")
    def _accepted_names_suggestions(self) -> Feedback:
        # acceptedSuggestions: "Required for accepted outcomes."
        if self.outcome == "accepted" and not self.acceptedSuggestions:
            raise ValueError("an 'accepted' feedback names its acceptedSuggestions")
        return self


class FeedbackRequest(_Wire):
    feedback: list[Feedback] = Field(min_length=1, max_length=MAX_FEEDBACK)
    extension: dict[str, Any] | None = None
