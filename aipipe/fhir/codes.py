"""Code systems, equivalent-code concepts and unit normalisation for common labs.

Codes travel as FHIR tokens, `system|code`. A concept groups codes that measure the same thing
(Synthea's glucose 2339-0 and the serum/plasma glucose 2345-7, say) and names one canonical UCUM
unit; `convert_unit` brings a value written in another unit to it. Molar ↔ mass conversions use
the analyte's molar mass (glucose 180.16 g/mol → 18.016 mg/dL per mmol/L; cholesterol 386.65 g/mol
→ 38.67; triglycerides, as triolein 885.4 g/mol → 88.57; creatinine 113.12 g/mol → 11.312 mg/dL
per mmol/L, i.e. 88.4 µmol/L per mg/dL).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"

SYSTEM_ALIASES: Mapping[str, str] = {
    "loinc": LOINC,
    "snomed": SNOMED,
    "sct": SNOMED,
    "icd10": ICD10CM,
    "icd10cm": ICD10CM,
    "icd-10-cm": ICD10CM,
    "rxnorm": RXNORM,
}


def expand_token(token: str) -> str:
    """Normalise `system|code`: expand short system names, strip blanks.

    >>> expand_token("loinc|2339-0")
    'http://loinc.org|2339-0'
    """
    system, sep, code = token.partition("|")
    if not sep or not code.strip() or not system.strip():
        raise ValueError(f"code '{token}' must be written system|code, e.g. loinc|2339-0")
    system = SYSTEM_ALIASES.get(system.strip().lower(), system.strip())
    return f"{system}|{code.strip()}"


def token_matches(pattern: str, token: str) -> bool:
    """True if `token` equals `pattern`, or `pattern` ends in `*` and is a prefix of `token`."""
    if pattern.endswith("*"):
        return token.startswith(pattern[:-1])
    return token == pattern


@dataclass(frozen=True)
class Concept:
    codes: tuple[str, ...]
    unit: str | None
    display: str


def _loinc(*codes: str) -> tuple[str, ...]:
    return tuple(f"{LOINC}|{code}" for code in codes)


CONCEPTS: Mapping[str, Concept] = {
    "glucose": Concept(_loinc("2339-0", "2345-7"), "mg/dL", "Glucose"),
    "creatinine": Concept(_loinc("38483-4", "2160-0"), "mg/dL", "Creatinine"),
    "ldl": Concept(_loinc("18262-6", "13457-7"), "mg/dL", "LDL cholesterol"),
    "hdl": Concept(_loinc("2085-9"), "mg/dL", "HDL cholesterol"),
    "cholesterol": Concept(_loinc("2093-3"), "mg/dL", "Total cholesterol"),
    "triglycerides": Concept(_loinc("2571-8"), "mg/dL", "Triglycerides"),
    "hba1c": Concept(_loinc("4548-4"), "%", "Hemoglobin A1c"),
    "bmi": Concept(_loinc("39156-5"), "kg/m2", "Body mass index"),
    "systolic_bp": Concept(_loinc("8480-6"), "mm[Hg]", "Systolic blood pressure"),
    "diastolic_bp": Concept(_loinc("8462-4"), "mm[Hg]", "Diastolic blood pressure"),
    "egfr": Concept(_loinc("33914-3", "98979-8"), "mL/min/{1.73_m2}", "eGFR"),
    "body_weight": Concept(_loinc("29463-7"), "kg", "Body weight"),
    "body_height": Concept(_loinc("8302-2"), "cm", "Body height"),
    "diabetes": Concept((f"{SNOMED}|44054006", f"{ICD10CM}|E11*"), None, "Type 2 diabetes"),
}

# Blood-pressure panels whose components become observation rows of their own.
BP_PANELS = frozenset(_loinc("55284-4", "85354-9"))

# Spellings of one UCUM unit seen in real resources, mapped to the UCUM code.
_UNIT_SPELLINGS: Mapping[str, str] = {
    "mg/dl": "mg/dL",
    "mmol/l": "mmol/L",
    "umol/l": "umol/L",
    "µmol/l": "umol/L",
    "mmhg": "mm[Hg]",
    "mm hg": "mm[Hg]",
    "mm[hg]": "mm[Hg]",
    "kg/m2": "kg/m2",
    "kg/m^2": "kg/m2",
    "%": "%",
    "ml/min/{1.73_m2}": "mL/min/{1.73_m2}",
    "ml/min/1.73m2": "mL/min/{1.73_m2}",
    "ml/min": "mL/min",
    "kg": "kg",
    "cm": "cm",
    "a": "a",
    "/min": "/min",
    "{beats}/min": "/min",
    "mm": "mm",
}

# (from unit, to unit, analyte codes or None for any) → factor: value_to = value_from * factor.
_MOLAR_MASS_MG_DL_PER_MMOL_L: Mapping[str, float] = {
    "glucose": 18.016,
    "cholesterol": 38.67,
    "ldl": 38.67,
    "hdl": 38.67,
    "triglycerides": 88.57,
    "creatinine": 11.312,
}

_EQUIVALENT_UNITS: Mapping[str, frozenset[str]] = {
    "mL/min/{1.73_m2}": frozenset({"mL/min"}),  # Synthea writes eGFR both ways
}


def canonical_unit(unit: str | None) -> str | None:
    """The UCUM spelling of `unit`, or None when aipipe does not know it."""
    if unit is None:
        return None
    return _UNIT_SPELLINGS.get(unit.strip().lower())


def _concept_of(code_token: str) -> str | None:
    for name, concept in CONCEPTS.items():
        if code_token in concept.codes:
            return name
    return None


def convert_unit(value: float, unit: str | None, target: str, code_token: str) -> float | None:
    """`value` expressed in `target`, or None when no conversion is known."""
    source = canonical_unit(unit)
    if source is None:
        return None
    if source == target or source in _EQUIVALENT_UNITS.get(target, frozenset()):
        return value
    concept = _concept_of(code_token)
    factor = _MOLAR_MASS_MG_DL_PER_MMOL_L.get(concept or "")
    if factor is None:
        return None
    if source == "mmol/L" and target == "mg/dL":
        return value * factor
    if source == "mg/dL" and target == "mmol/L":
        return value / factor
    if source == "umol/L" and target == "mg/dL":
        return value * factor / 1000.0
    if source == "mg/dL" and target == "umol/L":
        return value * 1000.0 / factor
    return None
