"""The model card a CDS card links to: what produced a score, at the path the router serves.

    GET /cds-services/{service_id}/model-card[?version=<model version>]

answers JSON (or HTML for a browser that asks for text/html) about one model version of the
service's study: the study and outcome, the version and its lineage (parent versions and rounds,
as the server knows them: the hub's model registry at the hub, what the node was told at the
node), the secure mode and the study's planned DP setting (ε, δ per site), the population and
inputs, the card thresholds, and `validation` (null until validation metrics are released: it
renders "not validated"). Every card's `source.url` and its `links` point here, pinned to the
version that scored it and signed to open without a JWT for a while (`aipipe.cds.links`); an
earlier version of the current lineage still answers.

It holds nothing per site or per patient beyond what the study file and the hub's registry
already state (no site's sizes, metrics or budget use).
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict

from aipipe.cds.provider import LineageStep, ServiceEntry

PATH = "/cds-services/{service_id}/model-card"


class ModelCard(BaseModel):
    """The JSON a model card answers. `validation` is an optional free-form mapping (metrics and
    calibration released under DP, added later); None reads "not validated"."""

    model_config = ConfigDict(extra="forbid")

    service: str
    study: str
    description: str
    title: str
    outcome: dict[str, Any]
    model_version: str
    current_version: str
    served_by: str
    lineage: list[dict[str, Any]]
    secure: str
    privacy: dict[str, Any]
    population: dict[str, Any] | None
    inputs: list[dict[str, Any]]
    thresholds: dict[str, float]
    validation: dict[str, Any] | None = None
    # A site's personal model (served by its node): sha256, method, the global version it was
    # derived from, what was chosen on the validation split. None for a federated model.
    personal: dict[str, Any] | None = None


def card_url(base: str, service_id: str, version: str) -> str:
    """The absolute URL of `version`'s model card under the service's `{baseUrl}`."""
    path = PATH.format(service_id=quote(service_id, safe=""))
    return f"{base.rstrip('/')}{path}?version={quote(version, safe='')}"


def model_card(entry: ServiceEntry, version: str | None = None) -> ModelCard | None:
    """The card of `version` (default: the entry's current one), or None when that version is
    not in the lineage the server knows."""
    chosen = version or entry.model_version
    steps = list(entry.lineage) or [LineageStep(entry.model_version)]
    index = next((i for i, step in enumerate(steps) if step.version == chosen), None)
    if index is None:
        return None
    study, source = entry.study, entry.source()
    privacy = study.privacy
    return ModelCard(
        service=entry.id,
        study=study.name,
        description=study.description,
        title=entry.title,
        outcome=source.outcome.dump(),
        model_version=chosen,
        current_version=entry.model_version,
        served_by=entry.served_by,
        lineage=[_step(step) for step in steps[index:]],
        secure=study.secure,
        privacy={
            "mode": privacy.mode,
            "epsilon_per_site": privacy.epsilon if privacy.mode == "dp" else None,
            "delta_per_site": privacy.delta if privacy.mode == "dp" else None,
            "accountant": privacy.accountant,
            "clip": privacy.clip,
            "statistics_epsilon": privacy.stats_epsilon(),
            "planned": True,  # the study's setting, not any site's spend
        },
        population=None if study.population is None else study.population.model_dump(),
        inputs=[*_features(entry), *({"name": d, "demographic": True} for d in study.demographics)],
        thresholds=entry.settings.thresholds(),
        validation=_validation(steps[index]),
        personal=_personal(steps[index]),
    )


def _validation(step: LineageStep) -> dict[str, Any] | None:
    return None if step.validation is None else dict(step.validation)


def _personal(step: LineageStep) -> dict[str, Any] | None:
    return None if step.personal is None else dict(step.personal)


def _step(step: LineageStep) -> dict[str, Any]:
    return {
        k: v for k, v in vars(step).items() if v is not None and k not in ("validation", "personal")
    }


def _features(entry: ServiceEntry) -> list[dict[str, Any]]:
    out = []
    for feature in entry.study.features:
        item: dict[str, Any] = {
            "name": feature.name,
            "codes": feature.all_codes(),
            "unit": feature.target_unit(),
            "aggregation": feature.aggregation,
            "missing": feature.missing,
            "lookback_days": entry.study.lookback_days(feature),
        }
        out.append({k: v for k, v in item.items() if v is not None})
    return out


def render_html(card: ModelCard) -> str:
    """A plain page for a clinician's browser (every value escaped)."""

    def row(key: str, value: Any) -> str:
        return f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"

    privacy = card.privacy
    dp = (
        f"ε = {privacy['epsilon_per_site']}, δ = {privacy['delta_per_site']} per site (planned)"
        if privacy["mode"] == "dp"
        else "no differential privacy"
    )
    lineage = "".join(
        f"<li>round {html.escape(str(s.get('round', '?')))}: "
        f"<code>{html.escape(s['version'][:12])}</code></li>"
        for s in card.lineage
    )
    inputs = ", ".join(i["name"] for i in card.inputs)
    thresholds = ", ".join(f"{k} {v:g}" for k, v in card.thresholds.items())
    validation = (
        "not validated"
        if not card.validation
        else "; ".join(f"{k}: {v}" for k, v in card.validation.items())
    )
    rows = "".join(
        [
            row("Outcome", card.outcome.get("display", card.study)),
            row("Study", card.study),
            row("Model version", card.model_version),
            row("Served by", card.served_by),
            row("Secure aggregation", card.secure),
            row("Differential privacy", dp),
            row("Population", card.population or "not restricted"),
            row("Inputs", inputs),
            row("Thresholds", thresholds),
            row("Validation", validation),
            *([row("Personal model", card.personal)] if card.personal else []),
        ]
    )
    title = html.escape(card.title)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
        f"<body><h1>{title}</h1><p>{html.escape(card.description)}</p>"
        f"<table>{rows}</table><h2>Lineage (newest first)</h2><ol>{lineage}</ol></body></html>"
    )
