"""Model versions at the hub: the study's server step on a round's sum, and the registry.

A version is addressed by its weights and its place in the lineage (`version_id`); its lineage
names the round, the parent version, the aggregator and the contributors. Plaintext rounds
and secure ones (the protocols in `aipipe.hub.rounds`) all end in `ModelRegistry.publish` with
a `RoundSum`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from aipipe.aggregation import AggregationError, Aggregator, aggregator_for
from aipipe.audit.log import AuditLog
from aipipe.errors import NotFoundError
from aipipe.hub.personal import personalization_card
from aipipe.hub.validation import validation_card
from aipipe.personalization.parts import shared_part, with_shared
from aipipe.store.hub_rounds import RoundRow
from aipipe.store.hub_store import HubStore
from aipipe.study.spec import StudySpec
from aipipe.wire import ModelVersionInfo, RoundState
from aipipe.wire.tensors import Arrays, decode_arrays, encode_arrays


def version_id(study: str, number: int, parent: str | None, weights_digest: str) -> str:
    """A model version's address: its weights and its place in the lineage."""
    return hashlib.sha256(f"{study}:{number}:{parent}:{weights_digest}".encode()).hexdigest()


@dataclass(frozen=True)
class RoundSum:
    """What a finished round hands to the study's server step: its contributors and Σn, and
    either the decoded secure sum Σn·Δ (`weighted_sum`) or the study's aggregator with the
    round folded into it (`folded`: begin and accumulate done, finalize not yet); `excluded`
    the updates a study's `detection` left out of it, with their scores."""

    contributors: list[dict[str, Any]]
    total_examples: int
    weighted_sum: Arrays | None = None
    folded: Aggregator | None = None
    excluded: list[dict[str, Any]] = field(default_factory=list)


class ModelRegistry:
    def __init__(self, store: HubStore, audit: AuditLog) -> None:
        self.store = store
        self.audit = audit

    def publish(self, row: RoundRow, spec: StudySpec, result: RoundSum) -> None:
        """The study's server step on the round's sum; the new version becomes the study's head."""
        study_row = self.store.study(row.study)
        base = self.store.model(row.base_version)
        assert study_row is not None and base is not None
        base_weights = decode_arrays(self.store.blob(base["blob"]))
        global_weights = shared_part(spec, base_weights)  # all of them, unless personalized
        aggregator = result.folded or aggregator_for(spec.aggregation, spec.training.proximal_mu)
        if (optimizer_state := self.store.study_optimizer_state(study_row)) is not None:
            aggregator.load_optimizer_state(decode_arrays(optimizer_state))
        total_examples, contributors = result.total_examples, result.contributors
        try:
            if result.weighted_sum is not None:
                new = aggregator.from_sum(global_weights, result.weighted_sum, total_examples)
            else:
                new = aggregator.finalize()
        except AggregationError as exc:
            self.store.set_round_state(row.study, row.round, RoundState.FAILED, reason=str(exc))
            return
        blob = self.store.put_blob(encode_arrays(with_shared(base_weights, new)))
        version = version_id(row.study, row.round, row.base_version, blob)
        lineage = {
            "study": row.study,
            "study_digest": spec.digest(),
            "round": row.round,
            "parent": row.base_version,
            "aggregator": aggregator.name,
            "secure": spec.secure,
            "contributors": contributors,
            "total_examples": total_examples,
        }
        if result.excluded:
            lineage["excluded"] = result.excluded
        state = aggregator.optimizer_state()
        with self.store.transaction():  # model, study head and round move together
            self.store.add_model(
                version, row.study, row.round, row.base_version, aggregator.name, blob, lineage
            )
            self.store.set_study_head(row.study, version, encode_arrays(state) if state else None)
            self.store.set_round_state(
                row.study, row.round, RoundState.CLOSED, result_version=version
            )
        self.audit.append(
            "aggregate",
            actor="hub",
            resource=f"study/{row.study}/round/{row.round}",
            details={"nodes": len(contributors), "total": total_examples, "secure": spec.secure},
        )
        self.audit.append(
            "model.version",
            actor="hub",
            resource=f"model/{version}",
            details={"parent": row.base_version, "round": row.round},
        )

    def info(self, version: str) -> ModelVersionInfo:
        row = self.store.model(version)
        if row is None:
            raise NotFoundError(f"no model version {version[:12]}")
        lineage = json.loads(row["lineage"])
        return ModelVersionInfo(
            version=version,
            study=row["study"],
            round=row["round"],
            parent=row["parent"],
            created_at=row["created_at"],
            aggregator=row["aggregator"],
            contributors=lineage.get("contributors", []),
            excluded=lineage.get("excluded", []),
            metrics=self.store.metrics(version),
            validation=validation_card(self.store, version),
            personalization=self._personalization(row["study"]),
        )

    def _personalization(self, study: str) -> dict[str, Any] | None:
        row = self.store.study(study)
        if row is None:
            return None
        return _personalization_of(str(row["spec"]))

    def weights(self, version: str) -> bytes:
        row = self.store.model(version)
        if row is None:
            raise NotFoundError(f"no model version {version[:12]}")
        return self.store.blob(row["blob"])


@functools.lru_cache(maxsize=64)
def _card_of(spec_json: str) -> str:
    return json.dumps(personalization_card(StudySpec.model_validate(json.loads(spec_json))))


def _personalization_of(spec_json: str) -> dict[str, Any] | None:
    """A study's personalization card, made once per spec (it builds the method's model): every
    version's card and the model listing read it. A fresh copy each time: callers may edit it."""
    card: dict[str, Any] | None = json.loads(_card_of(spec_json))
    return card
