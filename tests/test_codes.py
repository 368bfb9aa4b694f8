"""Code tokens, concepts and unit conversion (aipipe.fhir.codes)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aipipe.fhir.codes import (
    CONCEPTS,
    ICD10,
    ICD10CM,
    LOINC,
    RXNORM,
    SNOMED,
    canonical_unit,
    convert_unit,
    expand_token,
    token_matches,
)

GLUCOSE = f"{LOINC}|2339-0"
CREATININE = f"{LOINC}|38483-4"
CHOLESTEROL = f"{LOINC}|2093-3"
EGFR = f"{LOINC}|33914-3"


@pytest.mark.parametrize(
    ("token", "expanded"),
    [
        ("loinc|2339-0", f"{LOINC}|2339-0"),
        ("LOINC|2339-0", f"{LOINC}|2339-0"),
        ("snomed|44054006", f"{SNOMED}|44054006"),
        ("sct|44054006", f"{SNOMED}|44054006"),
        ("icd10|E11.9", f"{ICD10CM}|E11.9"),
        ("icd10cm|E11.9", f"{ICD10CM}|E11.9"),
        ("icd-10-cm|E11.9", f"{ICD10CM}|E11.9"),
        ("rxnorm|860975", f"{RXNORM}|860975"),
        (" loinc | 2339-0 ", f"{LOINC}|2339-0"),
    ],
)
def test_expand_token_replaces_a_short_system_name_by_its_uri(token: str, expanded: str) -> None:
    assert expand_token(token) == expanded


def test_expand_token_keeps_a_full_system_uri_as_written() -> None:
    token = "http://example.org/local-codes|ABC"

    assert expand_token(token) == token


@pytest.mark.parametrize("token", ["2339-0", "loinc|", "|2339-0", "loinc|  ", "  |2339-0", ""])
def test_expand_token_refuses_a_token_without_both_system_and_code(token: str) -> None:
    with pytest.raises(ValueError, match="system\\|code"):
        expand_token(token)


@given(
    system=st.sampled_from(["loinc", "snomed", "icd10", "rxnorm", "http://x.org/cs"]),
    code=st.from_regex(r"[A-Za-z0-9.\-]{1,12}", fullmatch=True),
)
def test_expand_token_is_idempotent(system: str, code: str) -> None:
    once = expand_token(f"{system}|{code}")

    assert expand_token(once) == once


@pytest.mark.parametrize("token", [f"{ICD10CM}|E11", f"{ICD10CM}|E11.9", f"{ICD10CM}|E11.65"])
def test_an_icd10_wildcard_matches_the_code_and_its_descendants(token: str) -> None:
    assert token_matches(f"{ICD10CM}|E11*", token)


@pytest.mark.parametrize(
    "token", [f"{ICD10CM}|E10.9", f"{ICD10CM}|E1", f"{ICD10}|E11.9", f"{SNOMED}|E11"]
)
def test_an_icd10_wildcard_does_not_match_other_codes_or_systems(token: str) -> None:
    assert not token_matches(f"{ICD10CM}|E11*", token)


def test_a_pattern_without_wildcard_matches_only_the_exact_token() -> None:
    assert token_matches(GLUCOSE, GLUCOSE)
    assert not token_matches(f"{LOINC}|2339", GLUCOSE)


def test_glucose_in_mmol_per_litre_converts_to_mg_per_decilitre() -> None:
    converted = convert_unit(5.5, "mmol/L", "mg/dL", GLUCOSE)

    assert converted == pytest.approx(99.09, abs=0.005)


def test_glucose_of_the_serum_plasma_code_converts_like_synthea_glucose() -> None:
    converted = convert_unit(5.5, "mmol/L", "mg/dL", f"{LOINC}|2345-7")

    assert converted == pytest.approx(99.09, abs=0.005)


@pytest.mark.parametrize("unit", ["umol/L", "µmol/L", "UMOL/L", " µmol/l "])
def test_creatinine_of_88_4_micromol_per_litre_is_one_mg_per_decilitre(unit: str) -> None:
    converted = convert_unit(88.4, unit, "mg/dL", CREATININE)

    assert converted == pytest.approx(1.0, abs=1e-3)


def test_creatinine_of_one_mg_per_decilitre_is_88_4_micromol_per_litre() -> None:
    converted = convert_unit(1.0, "mg/dL", "umol/L", CREATININE)

    assert converted == pytest.approx(88.4, abs=1e-2)


def test_cholesterol_in_mmol_per_litre_converts_with_its_molar_mass() -> None:
    converted = convert_unit(5.0, "mmol/L", "mg/dL", CHOLESTEROL)

    assert converted == pytest.approx(193.35, abs=0.01)


def test_cholesterol_in_mg_per_decilitre_converts_back_to_mmol_per_litre() -> None:
    converted = convert_unit(193.35, "mg/dL", "mmol/L", CHOLESTEROL)

    assert converted == pytest.approx(5.0, abs=1e-3)


@given(
    value=st.floats(min_value=0.01, max_value=1e4, allow_nan=False),
    code=st.sampled_from([GLUCOSE, CHOLESTEROL, f"{LOINC}|2571-8", f"{LOINC}|2085-9"]),
)
def test_converting_mmol_to_mg_and_back_returns_the_value(value: float, code: str) -> None:
    there = convert_unit(value, "mmol/L", "mg/dL", code)
    assert there is not None

    back = convert_unit(there, "mg/dL", "mmol/L", code)

    assert back == pytest.approx(value, rel=1e-9)


@given(value=st.floats(min_value=0.0, max_value=1e4, allow_nan=False))
def test_a_value_already_in_the_target_unit_is_unchanged(value: float) -> None:
    assert convert_unit(value, "mg/dl", "mg/dL", GLUCOSE) == value


@pytest.mark.parametrize("unit", ["furlongs", "g/L", "", None])
def test_an_unknown_unit_converts_to_none(unit: str | None) -> None:
    assert convert_unit(5.5, unit, "mg/dL", GLUCOSE) is None


def test_a_molar_unit_for_an_analyte_without_a_molar_mass_converts_to_none() -> None:
    assert convert_unit(5.5, "mmol/L", "%", f"{LOINC}|4548-4") is None


def test_egfr_in_ml_per_min_is_accepted_for_ml_per_min_per_1_73_m2() -> None:
    converted = convert_unit(62.0, "mL/min", "mL/min/{1.73_m2}", EGFR)

    assert converted == 62.0


def test_the_equivalence_of_egfr_units_does_not_run_backwards() -> None:
    assert convert_unit(62.0, "mL/min/{1.73_m2}", "mL/min", EGFR) is None


@pytest.mark.parametrize(
    ("written", "ucum"),
    [("mmHg", "mm[Hg]"), ("mm Hg", "mm[Hg]"), ("MG/DL", "mg/dL"), ("{beats}/min", "/min")],
)
def test_canonical_unit_maps_common_spellings_to_ucum(written: str, ucum: str) -> None:
    assert canonical_unit(written) == ucum


def test_every_concept_code_is_a_full_system_token() -> None:
    codes = [code for concept in CONCEPTS.values() for code in concept.codes]

    assert all(code.startswith("http") and "|" in code for code in codes)
