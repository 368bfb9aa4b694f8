"""FHIR R4 resource → store rows.

`map_resource` checks what the store relies on (identity, subject, numeric values) and turns a
resource into the rows feature extraction reads: one observation row per coding of the code and
one per panel component (systolic/diastolic blood pressure inside 55284-4 or 85354-9), a
condition row per coding, a medication row per coding. A resource that fails a check raises
`ResourceRejected` with a reason that names the element, never a value (values may be PHI).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aipipe.fhir.codes import CONCEPTS, convert_unit

_TYPE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class ResourceRejected(Exception):
    """A resource the store cannot take; `reason` is safe to report (no values)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PatientRow:
    id: str
    birth_year: int | None
    birth_date: str | None
    sex: str | None
    deceased: bool


@dataclass(frozen=True)
class ObservationRow:
    resource_id: str
    component: int
    patient_id: str
    code: str
    value: float | None
    value_code: str | None
    unit: str | None
    effective: str | None


@dataclass(frozen=True)
class CodedRow:
    """A condition or medication: one row per coding."""

    resource_id: str
    patient_id: str
    code: str
    status: str | None
    time: str | None


@dataclass
class MappedResource:
    type: str
    id: str
    version_id: str | None
    last_updated: str | None
    patient_id: str | None
    json: str
    hash: str
    patient: PatientRow | None = None
    observations: list[ObservationRow] = field(default_factory=list)
    coded: list[CodedRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def canonical_json(resource: Mapping[str, Any]) -> str:
    return json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def map_resource(resource: Any, raw_text: str | None = None) -> MappedResource:
    """Validate `resource` and derive its rows. `raw_text`, when given, is stored verbatim."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise ResourceRejected("not a FHIR resource (no resourceType)")
    rtype: str = resource["resourceType"]
    if not _TYPE.match(rtype):
        # Not a type name, so possibly anything: naming it in a reason could leak content.
        raise ResourceRejected("not a FHIR resource (resourceType is not a type name)")
    rid = resource.get("id")
    if rid is None:
        raise ResourceRejected(f"{rtype} has no id (and no fullUrl to derive one)")
    if not isinstance(rid, str) or not _ID.match(rid):
        raise ResourceRejected(f"{rtype}.id is not a valid FHIR id")
    meta: dict[str, Any] = resource["meta"] if isinstance(resource.get("meta"), dict) else {}
    text = raw_text if raw_text is not None else canonical_json(resource)
    mapped = MappedResource(
        type=rtype,
        id=rid,
        version_id=_opt_str(meta.get("versionId")),
        last_updated=_opt_str(meta.get("lastUpdated")),
        patient_id=None,
        json=text,
        hash=hashlib.sha256(text.encode()).hexdigest(),
    )
    _MAPPERS.get(rtype, _map_other)(resource, mapped)
    return mapped


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def reference_id(reference: Any, expected_type: str) -> str | None:
    """`Patient/123`, `http://x/fhir/Patient/123` or `Patient/123/_history/2` → `123`."""
    if not isinstance(reference, dict):
        return None
    ref = reference.get("reference")
    if not isinstance(ref, str):
        return None
    history = ref.find("/_history/")
    if history >= 0:
        ref = ref[:history]
    head, _, rid = ref.rpartition("/")
    if (head == expected_type or head.endswith("/" + expected_type)) and _ID.match(rid):
        return rid
    return None


def _subject(resource: dict[str, Any], rtype: str) -> str:
    ref = resource.get("subject", resource.get("patient"))
    if ref is None:
        raise ResourceRejected(f"{rtype} has no subject")
    patient = reference_id(ref, "Patient")
    if patient is None:
        raise ResourceRejected(f"{rtype}.subject is not a Patient reference")
    return patient


def _tokens(concept: Any) -> list[str]:
    """`system|code` for each usable coding of a CodeableConcept."""
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return []
    tokens = []
    for coding in concept["coding"]:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            system = coding.get("system") if isinstance(coding.get("system"), str) else ""
            tokens.append(f"{system}|{coding['code']}")
    return tokens


def _map_patient(resource: dict[str, Any], mapped: MappedResource) -> None:
    birth = resource.get("birthDate")
    birth_year = None
    if isinstance(birth, str) and re.match(r"^\d{4}", birth):
        birth_year = int(birth[:4])
    elif birth is not None:
        raise ResourceRejected("Patient.birthDate is not a date")
    gender = resource.get("gender")
    deceased = bool(resource.get("deceasedBoolean") or resource.get("deceasedDateTime"))
    mapped.patient_id = mapped.id
    mapped.patient = PatientRow(
        id=mapped.id,
        birth_year=birth_year,
        birth_date=birth if isinstance(birth, str) else None,
        sex=gender if isinstance(gender, str) else None,
        deceased=deceased,
    )


def _effective(resource: dict[str, Any]) -> str | None:
    for key in ("effectiveDateTime", "effectiveInstant", "issued"):
        if isinstance(resource.get(key), str):
            return str(resource[key])
    period = resource.get("effectivePeriod")
    if isinstance(period, dict) and isinstance(period.get("start"), str):
        return str(period["start"])
    return None


def _value(element: dict[str, Any], where: str) -> tuple[float | None, str | None, str | None]:
    """(numeric value, coded value, unit) of an Observation or component value[x]."""
    if "valueQuantity" in element:
        quantity = element["valueQuantity"]
        if not isinstance(quantity, dict):
            raise ResourceRejected(f"{where}.valueQuantity is not an object")
        number = quantity.get("value")
        if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
            raise ResourceRejected(f"{where}.valueQuantity.value is not a number")
        unit = quantity.get("code", quantity.get("unit"))
        return (
            float(number) if number is not None else None,
            None,
            unit if isinstance(unit, str) else None,
        )
    if "valueInteger" in element:
        number = element["valueInteger"]
        if isinstance(number, bool) or not isinstance(number, int):
            raise ResourceRejected(f"{where}.valueInteger is not an integer")
        return float(number), None, None
    if "valueBoolean" in element:
        if not isinstance(element["valueBoolean"], bool):
            raise ResourceRejected(f"{where}.valueBoolean is not a boolean")
        return float(element["valueBoolean"]), None, None
    if "valueCodeableConcept" in element:
        tokens = _tokens(element["valueCodeableConcept"])
        return None, tokens[0] if tokens else None, None
    return None, None, None


def _map_observation(resource: dict[str, Any], mapped: MappedResource) -> None:
    patient = _subject(resource, "Observation")
    mapped.patient_id = patient
    codes = _tokens(resource.get("code"))
    if not codes:
        raise ResourceRejected("Observation has no code")
    effective = _effective(resource)
    parts: list[tuple[int, list[str], dict[str, Any]]] = [(0, codes, resource)]
    components = resource.get("component")
    if isinstance(components, list):
        for index, component in enumerate(components, start=1):
            if isinstance(component, dict):
                parts.append((index, _tokens(component.get("code")), component))
    for index, tokens, element in parts:
        where = "Observation" if index == 0 else "Observation.component"
        value, value_code, unit = _value(element, where)
        for token in tokens:
            _check_unit(token, value, unit, mapped)
            mapped.observations.append(
                ObservationRow(mapped.id, index, patient, token, value, value_code, unit, effective)
            )


_CANONICAL_UNIT = {
    code: (name, concept.unit)
    for name, concept in CONCEPTS.items()
    if concept.unit is not None
    for code in concept.codes
}


@functools.lru_cache(maxsize=4096)
def _unit_known(token: str, unit: str | None) -> bool:
    name_unit = _CANONICAL_UNIT.get(token)
    return name_unit is None or convert_unit(1.0, unit, name_unit[1], token) is not None


def _check_unit(token: str, value: float | None, unit: str | None, mapped: MappedResource) -> None:
    """Warn when a known analyte comes in a unit that cannot be converted to its canonical one."""
    if value is not None and not _unit_known(token, unit):
        mapped.warnings.append(f"unknown unit '{unit}' for {_CANONICAL_UNIT[token][0]} ({token})")


def _map_condition(resource: dict[str, Any], mapped: MappedResource) -> None:
    patient = _subject(resource, "Condition")
    mapped.patient_id = patient
    codes = _tokens(resource.get("code"))
    if not codes:
        raise ResourceRejected("Condition has no code")
    onset = resource.get("onsetDateTime") or resource.get("recordedDate")
    status_tokens = _tokens(resource.get("clinicalStatus"))
    status = status_tokens[0].partition("|")[2] if status_tokens else None
    for token in codes:
        mapped.coded.append(CodedRow(mapped.id, patient, token, status, _opt_str(onset)))


def _map_medication(resource: dict[str, Any], mapped: MappedResource) -> None:
    patient = _subject(resource, mapped.type)
    mapped.patient_id = patient
    codes = _tokens(resource.get("medicationCodeableConcept"))
    when = resource.get("authoredOn") or _effective(resource) or resource.get("dateAsserted")
    for token in codes:
        mapped.coded.append(
            CodedRow(mapped.id, patient, token, _opt_str(resource.get("status")), _opt_str(when))
        )


def _map_other(resource: dict[str, Any], mapped: MappedResource) -> None:
    """Other types are stored raw, linked to their patient when they name one."""
    for key in ("subject", "patient", "beneficiary"):
        patient = reference_id(resource.get(key), "Patient")
        if patient is not None:
            mapped.patient_id = patient
            return
    if mapped.type == "DiagnosticReport" and "subject" not in resource:
        raise ResourceRejected("DiagnosticReport has no subject")


_MAPPERS = {
    "Patient": _map_patient,
    "Observation": _map_observation,
    "Condition": _map_condition,
    "MedicationRequest": _map_medication,
    "MedicationStatement": _map_medication,
}
