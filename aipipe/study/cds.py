"""A study's `cds:` block: how its CDS cards and RiskAssessments name the outcome and grade a
score. Without the block a study keeps the defaults (thresholds 0.3 / 0.7 / 0.9, every score
shown, the outcome named by its code's display or the study's name)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CdsSettings(BaseModel):
    """How a study's service words and grades its cards.

    `outcome_label` is the outcome as a clinician names it ("Type 2 diabetes"); `title` the
    service's title in discovery (default "<outcome> risk"). A probability at or above
    `moderate_at` reads "moderate" (indicator info), `warning_at` "high" (warning),
    `critical_at` "very high" (critical); below `min_probability` no card is shown.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    outcome_label: str | None = Field(default=None, min_length=1, max_length=80)
    title: str | None = Field(default=None, min_length=1, max_length=100)
    moderate_at: float = Field(default=0.3, ge=0, le=1)
    warning_at: float = Field(default=0.7, ge=0, le=1)
    critical_at: float = Field(default=0.9, ge=0, le=1)
    min_probability: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> CdsSettings:
        if not self.moderate_at <= self.warning_at <= self.critical_at:
            raise ValueError(
                f"thresholds must rise: moderate_at {self.moderate_at} <= warning_at "
                f"{self.warning_at} <= critical_at {self.critical_at}; reorder them"
            )
        return self

    def thresholds(self) -> dict[str, float]:
        return {
            "moderate_at": self.moderate_at,
            "warning_at": self.warning_at,
            "critical_at": self.critical_at,
            "min_probability": self.min_probability,
        }
