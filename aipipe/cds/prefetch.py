"""Prefetch templates for a study, and the checks on what a CDS Client sent for them.

A service asks for three things (CDS Hooks 2.0, "Prefetch Template"): the Patient (demographics),
an Observation search for every code the study's features read (plus the blood-pressure panels
that carry systolic and diastolic values as components), and a Condition search for the study's
outcome codes (only to say that the outcome is already on record). A search whose codes
include an ICD-10 prefix (`E11*`) cannot be written as a token search, so it asks for all of the
patient's Observations (or Conditions) instead.

What comes back is judged per key: `null` means "the client has no data" (the spec's rule), a
value of the wrong shape or for another patient blocks scoring, and stray entries inside an
otherwise good searchset Bundle are skipped and counted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aipipe.fhir.codes import BP_PANELS, LOINC, token_matches
from aipipe.fhir.mapping import reference_id
from aipipe.study.spec import StudySpec

PATIENT = "patient"
OBSERVATIONS = "observations"
CONDITIONS = "conditions"
REQUIRED = (PATIENT, OBSERVATIONS)
"""Keys without which the service cannot score: absent and not fetchable → HTTP 412."""

_BP_COMPONENTS = frozenset({f"{LOINC}|8480-6", f"{LOINC}|8462-4"})
_TOKEN = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
_USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


def _search(resource_type: str, codes: list[str]) -> str:
    query = f"{resource_type}?patient={{{{context.patientId}}}}"
    if codes and not any(code.endswith("*") for code in codes):
        query += "&code=" + ",".join(codes)
    return query


def prefetch_templates(study: StudySpec) -> dict[str, str]:
    """The prefetch templates a service for `study` publishes in discovery."""
    codes = {code for feature in study.features for code in feature.all_codes()}
    # A `code` search matches Observation.code, not component codes: systolic and diastolic
    # pressure mostly come as components of a blood-pressure panel, so ask for the panels too.
    if codes & _BP_COMPONENTS:
        codes |= BP_PANELS
    return {
        PATIENT: "Patient/{{context.patientId}}",
        OBSERVATIONS: _search("Observation", sorted(codes)),
        CONDITIONS: _search("Condition", sorted(study.cohort.label.conditions)),
    }


def render_template(template: str, context: Mapping[str, Any]) -> str:
    """Fill a template's prefetch tokens from a hook context: the relative FHIR URL to request.

    Raises `ValueError` when a token names a context field that is absent or not a string.
    """

    def fill(match: re.Match[str]) -> str:
        token = match.group(1)
        if token.startswith("context."):
            value = context.get(token.removeprefix("context."))
        elif token in _USER_TOKENS:
            user = context.get("userId")
            prefix = _USER_TOKENS[token] + "/"
            value = (
                user.removeprefix(prefix)
                if isinstance(user, str) and user.startswith(prefix)
                else None
            )
        else:
            value = None
        if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
            raise ValueError(f"prefetch token {{{{{token}}}}} cannot be filled from the context")
        return quote(str(value), safe="")

    return _TOKEN.sub(fill, template)


def unsatisfied(templates: Mapping[str, str], prefetch: Mapping[str, Any] | None) -> list[str]:
    """Template keys the client did not satisfy: absent, or answered with an OperationOutcome
    (how newer clients report a failed prefetch)."""
    given = prefetch or {}
    return [
        key
        for key in templates
        if key not in given or _resource_type(given[key]) == "OperationOutcome"
    ]


def _resource_type(value: Any) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("resourceType"), str):
        return str(value["resourceType"])
    return None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        kind = _resource_type(value)
        return f"a {kind}" if kind else "an object without resourceType"
    if isinstance(value, list):
        return "a JSON array"
    if isinstance(value, str):
        return "a string"
    return "a JSON " + type(value).__name__.replace("float", "number").replace("int", "number")


@dataclass
class PatientData:
    """The resources to score (the Patient and its Observations), and what was wrong with the rest.

    `blocking` problems mean no score can be given; `notes` are for the card's detail.
    """

    patient_id: str
    resources: list[dict[str, Any]] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    observations: int = 0
    outcome_recorded: bool = False


def collect(values: Mapping[str, Any], patient_id: str, study: StudySpec) -> PatientData:
    """Check prefetched (or fetched) values against the templates and keep the usable resources."""
    data = PatientData(patient_id)
    _take_patient(values.get(PATIENT), data)
    observations = _take_search(values, OBSERVATIONS, "Observation", data)
    data.resources.extend(observations)
    data.observations = len(observations)
    # Conditions only tell whether the outcome is on record; the model does not read them.
    conditions = _take_search(values, CONDITIONS, "Condition", data)
    labels = study.cohort.label.conditions
    data.outcome_recorded = any(
        token_matches(label, token)
        for resource in conditions
        for token in _codings(resource.get("code"))
        for label in labels
    )
    return data


def _take_patient(value: Any, data: PatientData) -> None:
    if value is None:
        data.blocking.append(
            f"there is no Patient resource for the patient in context ('{PATIENT}' is null or "
            "was not found)"
        )
        return
    candidate = value
    if _resource_type(value) == "Bundle":
        patients = [r for r in _entry_resources(value) if _resource_type(r) == "Patient"]
        candidate = patients[0] if len(patients) == 1 else value
    if _resource_type(candidate) != "Patient":
        data.blocking.append(f"prefetch '{PATIENT}' holds {_describe(value)}, not a Patient")
    elif candidate.get("id") != data.patient_id:
        data.blocking.append(
            f"prefetch '{PATIENT}' holds a different patient from context.patientId"
        )
    else:
        data.resources.append(candidate)


def _entry_resources(bundle: dict[str, Any]) -> list[Any]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        return []
    return [entry.get("resource") if isinstance(entry, dict) else None for entry in entries]


def _take_search(
    values: Mapping[str, Any], key: str, resource_type: str, data: PatientData
) -> list[dict[str, Any]]:
    value = values.get(key)
    if value is None:  # absent (optional key) or null: "no data"
        return []
    if _resource_type(value) != "Bundle" or not isinstance(value.get("entry", []), list):
        data.blocking.append(
            f"prefetch '{key}' holds {_describe(value)}, not a Bundle of {resource_type} resources"
        )
        return []
    kept: list[dict[str, Any]] = []
    skipped = {"not a resource": 0, "another resource type": 0, "another patient": 0}
    reported = 0
    for resource in _entry_resources(value):
        kind = _resource_type(resource)
        if kind == "OperationOutcome":
            reported += 1
        elif kind is None:
            skipped["not a resource"] += 1
        elif kind != resource_type:
            skipped["another resource type"] += 1
        elif reference_id(resource.get("subject"), "Patient") != data.patient_id:
            skipped["another patient"] += 1
        else:
            kept.append(resource)
    for why, count in skipped.items():
        if count:
            entries = "entry" if count == 1 else "entries"
            data.notes.append(f"{count} {entries} of prefetch '{key}' skipped: {why}")
    if reported:
        data.notes.append(f"the FHIR server reported {reported} issue(s) with the '{key}' search")
    if any(isinstance(link, dict) and link.get("relation") == "next" for link in _links(value)):
        data.notes.append(f"prefetch '{key}' holds one page of a longer result; later pages unread")
    return kept


def _links(bundle: dict[str, Any]) -> list[Any]:
    links = bundle.get("link", [])
    return links if isinstance(links, list) else []


def _codings(concept: Any) -> list[str]:
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return []
    return [
        f"{coding.get('system', '')}|{coding['code']}"
        for coding in concept["coding"]
        if isinstance(coding, dict) and isinstance(coding.get("code"), str)
    ]
