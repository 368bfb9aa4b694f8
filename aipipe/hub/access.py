"""What each credential may read and report at the hub: the admin token everything, a node
credential only what concerns the studies it takes part in.

A node *takes part* in a study when it was selected for one of the study's rounds (the hub
offered it work there) and has not been excluded since (`HubStore.takes_part`). Then:

- a study's definition is readable by every node not excluded from it: each enrolled node is
  invited to a published study and must read it to approve it before its first round;
- the study's rounds, model versions and weights only by nodes that take part;
- what a node reads about a round or a model carries no other site's n, ε, update norm,
  decline reason or evaluation report (the admin sees them): only its own;
- a node reports evaluation metrics only for a trained version (round ≥ 1) of a study it takes
  part in, and feature statistics only for such a study, only when the study releases them
  (noised under DP, `StudySpec.statistics_ranges`), with the noised n within the study's
  `bounds.max_examples` up to the noise and finite values. Refused reports are audited.
"""

from __future__ import annotations

import math
from typing import NoReturn, Protocol

from aipipe.errors import ConflictError, ForbiddenError, NotFoundError
from aipipe.hub.principal import Principal
from aipipe.hub.rounds.context import RoundContext
from aipipe.privacy.statistics import noise_multiplier, sensitivity
from aipipe.study.spec import StudySpec
from aipipe.wire import FeatureStats, ModelVersionInfo, RoundInfo, StudyInfo


class Studies(Protocol):
    """What `Access` reads of the hub's studies and rounds in full (`HubService` is one)."""

    def study_info(self, name: str) -> StudyInfo: ...

    def round_info(self, study: str, number: int) -> RoundInfo: ...


class Access:
    def __init__(self, ctx: RoundContext, studies: Studies) -> None:
        self._ctx = ctx
        self._studies = studies
        self._store = ctx.store

    # -- reads -------------------------------------------------------------------------------

    def study(self, who: Principal, study: str) -> StudyInfo:
        info = self._studies.study_info(study)
        if who.kind == "node" and self._store.excluded(study, who.name):
            raise ForbiddenError(f"node '{who.name}' is excluded from study '{study}'")
        return info

    def rounds(self, who: Principal, study: str) -> list[RoundInfo]:
        self._require_part(who, study)
        return [self._round(who, study, r.round) for r in self._store.rounds(study)]

    def round(self, who: Principal, study: str, number: int) -> RoundInfo:
        self._require_part(who, study)
        return self._round(who, study, number)

    def models(self, who: Principal, study: str | None) -> list[ModelVersionInfo]:
        rows = self._store.models(study)
        if who.kind == "node":
            taking_part = {
                str(s["name"])
                for s in self._store.studies()
                if self._store.takes_part(s["name"], who.name)
            }
            rows = [r for r in rows if r["study"] in taking_part]
        return [self.model(who, r["version"]) for r in rows]

    def model(self, who: Principal, version: str) -> ModelVersionInfo:
        info = self._ctx.models.info(version)
        if who.kind != "node":  # people see every site's numbers; roles gate the route
            return info
        self._require_part(who, info.study)
        contributors = [
            c if c.get("node") == who.name else {"node": c.get("node")} for c in info.contributors
        ]
        excluded = [c for c in info.excluded if c.get("node") == who.name]
        metrics = {k: v for k, v in info.metrics.items() if k == who.name}
        return info.model_copy(
            update={"contributors": contributors, "excluded": excluded, "metrics": metrics}
        )

    def weights(self, who: Principal, version: str) -> bytes:
        """A version's weights, under `model`'s rules without building its card: every node
        downloads two versions a round, and a personalized study's card builds its model."""
        row = self._store.model(version)
        if row is None:
            raise NotFoundError(f"no model version {version[:12]}")
        if who.kind == "node":
            self._require_part(who, str(row["study"]))
        return self._ctx.models.weights(version)

    # -- reports -----------------------------------------------------------------------------

    def check_metrics(self, node: str, version: str) -> None:
        row = self._store.model(version)
        if row is None:
            raise NotFoundError(f"no model version {version[:12]}")
        if row["round"] < 1 or not self._store.takes_part(row["study"], node):
            self._refuse(
                "metrics.refused",
                node,
                f"model/{version}",
                f"node '{node}' was not asked to evaluate version {version[:12]} (round "
                f"{row['round']} of '{row['study']}'): it reports only on trained versions of "
                "studies it takes part in",
            )

    def check_stats(self, node: str, study: str, stats: FeatureStats) -> None:
        spec = self._ctx.spec(study)
        if not self._store.takes_part(study, node):
            self._refuse(
                "stats.refused",
                node,
                f"study/{study}",
                f"node '{node}' takes no part in study '{study}' (never selected for a round, "
                "or excluded): its statistics are not pooled",
            )
        problem = _stats_problem(stats, spec)
        if problem is not None:
            self._refuse("stats.refused", node, f"study/{study}", problem, conflict=True)

    # -- helpers -----------------------------------------------------------------------------

    def _require_part(self, who: Principal, study: str) -> None:
        self._studies.study_info(study)  # 404 for a study that does not exist
        if who.kind == "node" and not self._store.takes_part(study, who.name):
            raise ForbiddenError(
                f"node '{who.name}' takes no part in study '{study}': its rounds and models "
                "are for the nodes selected for them"
            )

    def _round(self, who: Principal, study: str, number: int) -> RoundInfo:
        info = self._studies.round_info(study, number)
        if who.kind != "node":
            return info
        declined = {k: v if k == who.name else "declined" for k, v in info.declined.items()}
        metrics = {k: v for k, v in info.metrics.items() if k == who.name}
        return info.model_copy(update={"declined": declined, "metrics": metrics})

    def _refuse(
        self, action: str, node: str, resource: str, reason: str, *, conflict: bool = False
    ) -> NoReturn:
        self._ctx.audit.append(
            action, actor=node, resource=resource, outcome="refused", details={"reason": reason}
        )
        raise ConflictError(reason) if conflict else ForbiddenError(reason)


def _stats_problem(stats: FeatureStats, spec: StudySpec) -> str | None:
    """Why a site's noised statistics cannot be pooled, or None. A site weighs by its n in the
    pool: n is bounded like an update's (up to the noise: six of its σ above max_examples),
    and a NaN or infinity would poison every patient's score."""
    ranges = spec.statistics_ranges()
    if ranges is None:
        return (
            f"study '{spec.name}' releases no preprocessing statistics (secure aggregation, no "
            "DP, statistics_epsilon 0 or a numeric feature without a `range`): CDS for it is "
            "served at the nodes (`aipipe node serve-cds`)"
        )
    privacy = spec.privacy
    z = noise_multiplier(privacy.stats_epsilon(), privacy.delta, privacy.accountant)
    limit = spec.bounds.max_examples + 6 * z * sensitivity(len(ranges))
    if not math.isfinite(stats.n) or stats.n > limit:
        return (
            f"statistics claim n={stats.n:g} but the study allows at most "
            f"max_examples={spec.bounds.max_examples} per site (noised: up to {limit:.0f})"
        )
    for name, values in (("sums", stats.sums), ("squares", stats.squares)):
        if len(values) != len(ranges):
            return f"statistics hold {len(values)} {name} for {len(ranges)} columns"
        if not all(math.isfinite(v) for v in values):
            return f"statistics hold a NaN or infinite value in {name}"
    return None
