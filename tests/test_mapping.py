"""FHIR resource → store rows, and the reasons a resource is rejected (aipipe.fhir.mapping)."""

from __future__ import annotations

from typing import Any

import pytest

from aipipe.fhir.codes import LOINC, RXNORM, SNOMED
from aipipe.fhir.mapping import (
    CodedRow,
    ObservationRow,
    ResourceRejected,
    map_resource,
    reference_id,
)

SYSTOLIC = f"{LOINC}|8480-6"
DIASTOLIC = f"{LOINC}|8462-4"


def coding(system: str, code: str) -> dict[str, Any]:
    return {"system": system, "code": code}


def observation(**fields: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": "obs-1",
        "status": "final",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [coding(LOINC, "2339-0")]},
        "effectiveDateTime": "2020-05-01T10:00:00Z",
        "valueQuantity": {"value": 95, "unit": "mg/dL", "code": "mg/dL"},
    }
    resource.update(fields)
    return {key: value for key, value in resource.items() if value is not None}


def bp_panel(panel_code: str) -> dict[str, Any]:
    def component(code: str, value: float) -> dict[str, Any]:
        return {
            "code": {"coding": [coding(LOINC, code)]},
            "valueQuantity": {"value": value, "unit": "mm[Hg]", "code": "mm[Hg]"},
        }

    return observation(
        id="bp-1",
        code={"coding": [coding(LOINC, panel_code)]},
        valueQuantity=None,
        component=[component("8480-6", 128), component("8462-4", 81)],
    )


def rejection(resource: Any) -> str:
    with pytest.raises(ResourceRejected) as caught:
        map_resource(resource)
    return caught.value.reason


# -- Patient ------------------------------------------------------------------------------


def test_a_patient_gives_its_birth_year_and_sex() -> None:
    resource = {"resourceType": "Patient", "id": "p1", "birthDate": "1961-07-14", "gender": "male"}

    mapped = map_resource(resource)

    assert mapped.patient is not None
    assert (mapped.patient.birth_year, mapped.patient.sex) == (1961, "male")
    assert mapped.patient.birth_date == "1961-07-14"
    assert mapped.patient_id == "p1"


def test_a_patient_with_a_deceased_date_is_deceased() -> None:
    resource = {"resourceType": "Patient", "id": "p1", "deceasedDateTime": "2019-01-01"}

    mapped = map_resource(resource)

    assert mapped.patient is not None
    assert mapped.patient.deceased is True
    assert mapped.patient.birth_year is None


def test_a_patient_whose_birth_date_is_not_a_date_is_rejected() -> None:
    reason = rejection({"resourceType": "Patient", "id": "p1", "birthDate": "unknown"})

    assert reason == "Patient.birthDate is not a date"


# -- Observation --------------------------------------------------------------------------


def test_an_observation_with_a_value_quantity_gives_one_row() -> None:
    mapped = map_resource(observation())

    assert mapped.observations == [
        ObservationRow(
            "obs-1", 0, "p1", f"{LOINC}|2339-0", 95.0, None, "mg/dL", "2020-05-01T10:00:00Z"
        )
    ]
    assert mapped.patient_id == "p1"
    assert mapped.warnings == []


def test_meta_version_and_last_updated_are_kept() -> None:
    mapped = map_resource(observation(meta={"versionId": "3", "lastUpdated": "2024-01-02T03:04Z"}))

    assert (mapped.version_id, mapped.last_updated) == ("3", "2024-01-02T03:04Z")


def test_the_raw_text_given_is_stored_verbatim_and_hashed() -> None:
    raw = '{"resourceType": "Patient",   "id": "p1"}'

    mapped = map_resource({"resourceType": "Patient", "id": "p1"}, raw_text=raw)
    other = map_resource({"resourceType": "Patient", "id": "p1"})

    assert mapped.json == raw
    assert mapped.hash != other.hash


@pytest.mark.parametrize("panel", ["55284-4", "85354-9"])
def test_blood_pressure_panel_components_become_rows_of_their_own(panel: str) -> None:
    mapped = map_resource(bp_panel(panel))

    rows = {(row.component, row.code): row.value for row in mapped.observations}
    assert rows == {(0, f"{LOINC}|{panel}"): None, (1, SYSTOLIC): 128.0, (2, DIASTOLIC): 81.0}


def test_panel_component_rows_carry_the_panel_subject_and_time() -> None:
    mapped = map_resource(bp_panel("55284-4"))

    systolic = next(row for row in mapped.observations if row.code == SYSTOLIC)
    assert (systolic.resource_id, systolic.patient_id) == ("bp-1", "p1")
    assert systolic.effective == "2020-05-01T10:00:00Z"
    assert systolic.unit == "mm[Hg]"


def test_an_observation_with_several_codings_gives_a_row_per_coding() -> None:
    codes = {"coding": [coding(LOINC, "2339-0"), coding(LOINC, "2345-7"), {"display": "no code"}]}

    mapped = map_resource(observation(code=codes))

    assert [row.code for row in mapped.observations] == [f"{LOINC}|2339-0", f"{LOINC}|2345-7"]
    assert {row.value for row in mapped.observations} == {95.0}


def test_a_coded_value_is_kept_as_value_code() -> None:
    smoking = {"coding": [coding(SNOMED, "266919005")]}

    mapped = map_resource(observation(valueQuantity=None, valueCodeableConcept=smoking))

    (row,) = mapped.observations
    assert (row.value, row.value_code) == (None, f"{SNOMED}|266919005")


def test_an_unknown_unit_for_glucose_warns_but_keeps_the_resource() -> None:
    mapped = map_resource(observation(valueQuantity={"value": 5.5, "unit": "mmol/dL"}))

    assert [row.value for row in mapped.observations] == [5.5]
    assert len(mapped.warnings) == 1
    assert "mmol/dL" in mapped.warnings[0] and "glucose" in mapped.warnings[0]


def test_a_convertible_unit_for_glucose_gives_no_warning() -> None:
    mapped = map_resource(observation(valueQuantity={"value": 5.5, "code": "mmol/L"}))

    assert mapped.warnings == []


def test_a_subject_reference_with_base_url_and_history_resolves_to_the_patient_id() -> None:
    reference = {"reference": "https://ehr.example.org/fhir/Patient/p9/_history/2"}

    assert reference_id(reference, "Patient") == "p9"


def test_a_medication_statement_may_name_its_patient_in_subject() -> None:
    resource = {
        "resourceType": "MedicationStatement",
        "id": "ms-1",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"coding": [coding(RXNORM, "860975")]},
        "effectiveDateTime": "2020-01-01",
    }

    mapped = map_resource(resource)

    assert mapped.coded == [CodedRow("ms-1", "p1", f"{RXNORM}|860975", None, "2020-01-01")]


# -- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "reason"),
    [
        ({"id": "x"}, "not a FHIR resource (no resourceType)"),
        ({"resourceType": 7, "id": "x"}, "not a FHIR resource (no resourceType)"),
        (["not", "a", "resource"], "not a FHIR resource (no resourceType)"),
        ({"resourceType": "Observation"}, "Observation has no id (and no fullUrl to derive one)"),
        ({"resourceType": "Patient", "id": "has space"}, "Patient.id is not a valid FHIR id"),
        ({"resourceType": "Patient", "id": "x" * 65}, "Patient.id is not a valid FHIR id"),
        ({"resourceType": "Patient", "id": 12}, "Patient.id is not a valid FHIR id"),
        (observation(subject=None), "Observation has no subject"),
        (
            observation(subject={"reference": "Group/g1"}),
            "Observation.subject is not a Patient reference",
        ),
        (
            observation(subject={"display": "J. Doe"}),
            "Observation.subject is not a Patient reference",
        ),
        (observation(code=None), "Observation has no code"),
        (observation(code={"text": "glucose"}), "Observation has no code"),
        (
            observation(valueQuantity={"value": "12", "unit": "mg/dL"}),
            "Observation.valueQuantity.value is not a number",
        ),
        (
            observation(valueQuantity={"value": True}),
            "Observation.valueQuantity.value is not a number",
        ),
        (
            observation(valueQuantity=None, valueInteger=2.5),
            "Observation.valueInteger is not an integer",
        ),
        (
            observation(valueQuantity=None, valueInteger=2.0),
            "Observation.valueInteger is not an integer",
        ),
        (
            observation(valueQuantity=None, valueBoolean="yes"),
            "Observation.valueBoolean is not a boolean",
        ),
    ],
    ids=[
        "no-resourceType",
        "resourceType-not-string",
        "not-an-object",
        "no-id",
        "id-with-space",
        "id-too-long",
        "id-not-string",
        "observation-without-subject",
        "subject-is-a-group",
        "subject-without-reference",
        "no-code",
        "code-without-coding",
        "value-quantity-string",
        "value-quantity-boolean",
        "value-integer-float",
        "value-integer-whole-float",
        "value-boolean-string",
    ],
)
def test_a_resource_the_store_cannot_take_is_rejected_with_its_reason(
    resource: Any, reason: str
) -> None:
    assert rejection(resource) == reason


def test_a_component_with_a_string_value_rejects_the_whole_observation() -> None:
    panel = bp_panel("55284-4")
    panel["component"][1]["valueQuantity"]["value"] = "81"

    assert rejection(panel) == "Observation.component.valueQuantity.value is not a number"


def test_a_rejection_reason_never_carries_the_value() -> None:
    reason = rejection(observation(valueQuantity={"value": "SECRET-4242"}))

    assert "SECRET-4242" not in reason


def test_a_diagnostic_report_without_subject_is_rejected() -> None:
    assert rejection({"resourceType": "DiagnosticReport", "id": "d1"}) == (
        "DiagnosticReport has no subject"
    )


def test_another_type_is_stored_raw_and_linked_to_its_patient() -> None:
    resource = {"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}}

    mapped = map_resource(resource)

    assert (mapped.type, mapped.patient_id) == ("Encounter", "p1")
    assert mapped.observations == [] and mapped.coded == []


# -- Condition and MedicationRequest ------------------------------------------------------


def test_a_condition_gives_rows_with_onset_and_clinical_status() -> None:
    resource = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "clinicalStatus": {
            "coding": [coding("http://terminology.hl7.org/CodeSystem/condition-clinical", "active")]
        },
        "code": {"coding": [coding(SNOMED, "44054006"), coding(f"{LOINC}-not", "x")]},
        "onsetDateTime": "2015-03-02T08:00:00Z",
    }

    mapped = map_resource(resource)

    assert mapped.coded == [
        CodedRow("c1", "p1", f"{SNOMED}|44054006", "active", "2015-03-02T08:00:00Z"),
        CodedRow("c1", "p1", f"{LOINC}-not|x", "active", "2015-03-02T08:00:00Z"),
    ]


def test_a_condition_without_onset_falls_back_to_its_recorded_date() -> None:
    resource = {
        "resourceType": "Condition",
        "id": "c1",
        "subject": {"reference": "Patient/p1"},
        "code": {"coding": [coding(SNOMED, "38341003")]},
        "recordedDate": "2016-01-01",
    }

    (row,) = map_resource(resource).coded

    assert (row.time, row.status) == ("2016-01-01", None)


def test_a_condition_without_code_is_rejected() -> None:
    resource = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}}

    assert rejection(resource) == "Condition has no code"


def test_a_medication_request_gives_a_row_per_coding_with_status_and_authored_on() -> None:
    resource = {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {
            "coding": [coding(RXNORM, "860975"), coding(RXNORM, "1373463")]
        },
        "authoredOn": "2018-06-01T09:00:00Z",
    }

    mapped = map_resource(resource)

    assert mapped.coded == [
        CodedRow("m1", "p1", f"{RXNORM}|860975", "active", "2018-06-01T09:00:00Z"),
        CodedRow("m1", "p1", f"{RXNORM}|1373463", "active", "2018-06-01T09:00:00Z"),
    ]
    assert mapped.patient_id == "p1"


def test_a_medication_request_for_a_group_is_rejected() -> None:
    resource = {
        "resourceType": "MedicationRequest",
        "id": "m1",
        "subject": {"reference": "Group/g1"},
        "medicationCodeableConcept": {"coding": [coding(RXNORM, "860975")]},
    }

    assert rejection(resource) == "MedicationRequest.subject is not a Patient reference"
