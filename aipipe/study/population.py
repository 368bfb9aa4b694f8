"""Whom a study's model applies to (`population:` in the study), and each patient's age.

A patient outside the population is left out of training and gets no score, with a reason a
clinician can read. Age is whole years on the scoring day (`reference_date` in training, the
as-of day when scoring), or at death for a deceased patient: a man who died at 54 is 54, never
his age had he lived.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import date, timedelta

import numpy as np
from numpy.typing import NDArray

from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.store.node_store import field_label, resource_label
from aipipe.study.blocks import Feature
from aipipe.study.spec import StudySpec

_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})")


def _death_date(text: str | None) -> date | None:
    """Patient.deceasedDateTime's day from the stored Patient JSON, or None."""
    if text is None:
        return None
    try:
        value = json.loads(text).get("deceasedDateTime")
    except (ValueError, AttributeError):
        return None
    if not isinstance(value, str):
        return None
    if (m := _DATE.match(value)) is not None:
        try:
            return date(int(m[1]), int(m[2]), int(m[3]))
        except ValueError:
            return None
    return date(int(value[:4]), 12, 31) if re.match(r"^\d{4}$", value[:4]) else None


def patient_facts(
    conn: sqlite3.Connection, at_rest: AtRest = PLAIN
) -> dict[str, tuple[int | None, bool, date | None]]:
    """Each patient's (birth year, deceased, day of death if recorded); the stored Patient
    JSON opened with `at_rest` where the home seals it."""
    deaths = {
        pid: _death_date(
            None
            if text is None
            else at_rest.open_text(text, resource_label("Patient", pid), where=f"Patient/{pid}")
        )
        for pid, text in conn.execute(
            "SELECT p.id, r.json FROM patients p LEFT JOIN resources r "
            "ON r.type = 'Patient' AND r.id = p.id WHERE p.deceased = 1"
        )
    }
    return {
        pid: (_birth_year(at_rest, pid, sealed), bool(deceased), deaths.get(pid))
        for pid, sealed, deceased in conn.execute("SELECT id, birth_year, deceased FROM patients")
    }


def _birth_year(at_rest: AtRest, pid: str, sealed: int | bytes | None) -> int | None:
    label = field_label("patients", (pid,), "birth_year")
    year = at_rest.open_field(sealed, label, where=f"Patient/{pid} birth year")
    return None if year is None else int(year)


def age(birth_year: int | None, death: date | None, reference: date | None) -> float:
    """Age in years on `reference`, or at death when that came first; NaN when unknown."""
    if birth_year is None or reference is None:
        return float("nan")
    day = death if death is not None and death < reference else reference
    return float(day.year - birth_year)


def ages(
    conn: sqlite3.Connection,
    index: dict[str, int],
    reference: date | None,
    at_rest: AtRest = PLAIN,
) -> NDArray[np.float64]:
    out = np.full(len(index), np.nan)
    for pid, (birth_year, _, death) in patient_facts(conn, at_rest).items():
        if pid in index:
            out[index[pid]] = age(birth_year, death, reference)
    return out


def exclusions(
    conn: sqlite3.Connection, study: StudySpec, reference: date | None, at_rest: AtRest = PLAIN
) -> dict[str, str]:
    """Patients outside the study's population, each with the reason (none without one)."""
    population = study.population
    if population is None:
        return {}
    out: dict[str, str] = {}
    for pid, (birth_year, deceased, death) in patient_facts(conn, at_rest).items():
        if population.alive and deceased:
            when = f" on {death.isoformat()}" if death is not None else ""
            out[pid] = f"the patient died{when}; the model applies to living patients only"
            continue
        if population.age is None:
            continue
        lo, hi = population.age
        years = age(birth_year, death, reference)
        if np.isnan(years):
            out[pid] = f"no birth date; the model applies to patients aged {lo:g} to {hi:g}"
        elif not lo <= years <= hi:
            out[pid] = (
                f"the patient is {years:g} years old; the model applies to patients aged "
                f"{lo:g} to {hi:g}"
            )
    return out


def window_start(study: StudySpec, feature: Feature, reference: date | None) -> date | None:
    """The first day whose observations count for the feature (its look-back), or None."""
    days = study.lookback_days(feature)
    if days is None or reference is None:
        return None
    return reference - timedelta(days=days)
