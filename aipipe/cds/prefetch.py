"""Prefetch templates for a study, and the checks on what a CDS Client sent for them.

A service asks for three things (CDS Hooks 2.0, "Prefetch Template"): the Patient (demographics),
an Observation search for every code the study's features read (plus the blood-pressure panels
that carry systolic and diastolic values as components), and a Condition search for the study's
outcome codes (only to say that the outcome is already on record). A search whose codes
include an ICD-10 prefix (`E11*`) cannot be written as a token search, so it asks for all of the
patient's Observations (or Conditions) instead. Searches ask for `_count` entries a page, and the
Observation search for the newest first (`_sort=-date`): when every feature reads its latest
value, the reader may stop paging once each has one (`newest_values_found`). When the service
itself reads the search, a study's look-back window (`population.lookback_days`, where the
study declares one) narrows it to `date=ge…` (`lookback_filter`).

What comes back is judged per key: `null` means "the client has no data" (the spec's rule), a
value of the wrong shape or for another patient blocks scoring, and stray entries inside an
otherwise good searchset Bundle are skipped and counted. A subject is the patient's when it names
`Patient/{id}` (relative or absolute), or, as a server resolves references inside a Bundle, when
it is a `urn:uuid:` that is the fullUrl of that Patient's entry in the prefetch (or the patient's
own id as a uuid, unless an entry gives that fullUrl to someone else); such resources are kept
with the subject rewritten to `Patient/{id}`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any
from urllib.parse import quote

from aipipe.cds.evidence import CodeSet
from aipipe.fhir.codes import BP_PANELS, LOINC, token_matches
from aipipe.fhir.mapping import reference_id
from aipipe.study.spec import StudySpec

PATIENT = "patient"
OBSERVATIONS = "observations"
CONDITIONS = "conditions"
REQUIRED = (PATIENT, OBSERVATIONS)
"""Keys without which the service cannot score: absent and not fetchable → HTTP 412."""
SEARCH_COUNT = 200
"""Entries a search asks for per page (`_count`): a long record in a few pages."""

_BP_COMPONENTS = frozenset({f"{LOINC}|8480-6", f"{LOINC}|8462-4"})
_TOKEN = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")
_USER_TOKENS = {
    "userPractitionerId": "Practitioner",
    "userPractitionerRoleId": "PractitionerRole",
    "userPatientId": "Patient",
    "userRelatedPersonId": "RelatedPerson",
}


def _search(resource_type: str, codes: list[str], *, newest_first: bool) -> str:
    query = f"{resource_type}?patient={{{{context.patientId}}}}"
    if codes and not any(code.endswith("*") for code in codes):
        query += "&code=" + ",".join(codes)
    if newest_first:
        query += "&_sort=-date"
    return query + f"&_count={SEARCH_COUNT}"


def prefetch_templates(study: StudySpec) -> dict[str, str]:
    """The prefetch templates a service for `study` publishes in discovery."""
    codes = {code for feature in study.features for code in feature.all_codes()}
    # A `code` search matches Observation.code, not component codes: systolic and diastolic
    # pressure mostly come as components of a blood-pressure panel, so ask for the panels too.
    if codes & _BP_COMPONENTS:
        codes |= BP_PANELS
    return {
        PATIENT: "Patient/{{context.patientId}}",
        OBSERVATIONS: _search("Observation", sorted(codes), newest_first=True),
        CONDITIONS: _search("Condition", sorted(study.cohort.label.conditions), newest_first=False),
    }


def lookback_filter(study: StudySpec, as_of: date) -> str:
    """`&date=geYYYY-MM-DD` for the study's look-back window (a whole-study
    `population.lookback_days`), or "" when the study declares none."""
    population = getattr(study, "population", None)
    days = getattr(population, "lookback_days", None)
    if not isinstance(days, int) or isinstance(days, bool) or days <= 0:
        return ""
    return f"&date=ge{(as_of - timedelta(days=days)).isoformat()}"


def newest_values_found(study: StudySpec, as_of: date) -> Callable[[list[Any]], bool] | None:
    """For a study whose features all read their latest value: a test that the entries read so
    far (from a `_sort=-date` search) hold a value for every feature, dated on or before `as_of`,
    and came newest first (a server that ignored `_sort` is read to the end). None when some
    feature aggregates over all values (mean, min, max, count): every page is needed."""
    if not study.features or any(f.aggregation != "latest" for f in study.features):
        return None
    codesets = [CodeSet(f.all_codes()) for f in study.features]
    today = as_of.isoformat()

    def enough(entries: list[Any]) -> bool:
        found = [False] * len(codesets)
        previous = "9999"
        for entry in entries:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if _resource_type(resource) != "Observation":
                continue
            assert isinstance(resource, dict)
            when = _effective_day(resource)
            if when is None or when > previous:
                return False  # undated, or not newest first: the order cannot be trusted
            previous = when
            if when > today:
                continue
            for token in _valued_codes(resource):
                for index, codes in enumerate(codesets):
                    found[index] = found[index] or codes.matches(token)
        return all(found)

    return enough


def _effective_day(resource: dict[str, Any]) -> str | None:
    period = resource.get("effectivePeriod")
    for value in (
        resource.get("effectiveDateTime"),
        resource.get("effectiveInstant"),
        period.get("start") if isinstance(period, dict) else None,
    ):
        if isinstance(value, str) and len(value) >= 4:
            return value[:10]
    return None


def _valued_codes(resource: dict[str, Any]) -> list[str]:
    """The codes an Observation carries a value for: its own, and its components'."""
    tokens = _codings(resource.get("code")) if _has_value(resource) else []
    components = resource.get("component")
    for component in components if isinstance(components, list) else []:
        if isinstance(component, dict) and _has_value(component):
            tokens += _codings(component.get("code"))
    return tokens


def _has_value(element: dict[str, Any]) -> bool:
    return any(key.startswith("value") for key in element)


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
    aliases: frozenset[str] = frozenset()
    """`urn:uuid:` references that name the patient within this prefetch."""


def collect(values: Mapping[str, Any], patient_id: str, study: StudySpec) -> PatientData:
    """Check prefetched (or fetched) values against the templates and keep the usable resources."""
    data = PatientData(patient_id)
    _take_patient(values.get(PATIENT), data)
    data.aliases = _aliases(values, patient_id)
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


def _aliases(values: Mapping[str, Any], patient_id: str) -> frozenset[str]:
    """The `urn:uuid:` fullUrls the prefetch gives the patient in context, unambiguously."""
    owners: dict[str, set[str | None]] = {}
    for value in values.values():
        if _resource_type(value) != "Bundle" or not isinstance(value.get("entry"), list):
            continue
        for entry in value["entry"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("fullUrl"), str):
                continue
            resource = entry.get("resource")
            if _resource_type(resource) == "Patient":
                assert isinstance(resource, dict)
                owners.setdefault(entry["fullUrl"], set()).add(resource.get("id"))
            else:  # a fullUrl of some other resource is never the patient
                owners.setdefault(entry["fullUrl"], set()).add(None)
    own = f"urn:uuid:{patient_id}"
    owners.setdefault(own, {patient_id})
    return frozenset(
        url for url, ids in owners.items() if url.startswith("urn:uuid:") and ids == {patient_id}
    )


def _subject_is_patient(resource: dict[str, Any], data: PatientData) -> bool | None:
    """True: names the patient as `Patient/{id}`; None: by an alias (to rewrite); False: not."""
    subject = resource.get("subject")
    if reference_id(subject, "Patient") == data.patient_id:
        return True
    if isinstance(subject, dict) and subject.get("reference") in data.aliases:
        return None
    return False


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
        elif kind == "Patient" and resource.get("id") == data.patient_id:
            continue  # the patient itself, included in the searchset
        elif kind != resource_type:
            skipped["another resource type"] += 1
        elif (mine := _subject_is_patient(resource, data)) is False:
            skipped["another patient"] += 1
        elif mine is None:
            kept.append(resource | {"subject": {"reference": f"Patient/{data.patient_id}"}})
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
