"""A plaintext round's screening for a study with a `detection:` block, at the hub.

`screen` scores every update the round kept (`aipipe.hub.detection`), decides which flagged ones
are left out (all of them when the study says `exclude`, unless that would leave none: then the
round keeps them all and says so), records the scores and moves each node's reputation in the
hub store (once per round), and audits one ``update.flagged`` per flagged update with its numbers.

`admitted` is the selection side: a node whose reputation is under the study's floor is left out
of the round (audited ``node.excluded``) until an admin readmits it (`aipipe hub readmit`).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

from aipipe.hub.detection import score_updates, updated_reputation
from aipipe.hub.rounds.context import RoundContext
from aipipe.store.hub_reputation import Verdicts
from aipipe.study.detection import Detection
from aipipe.study.spec import StudySpec
from aipipe.wire.tensors import Arrays

ALL_FLAGGED = "every update was flagged; none was left out, so that the round keeps a model"


def screen(
    ctx: RoundContext, spec: StudySpec, number: int, deltas: Mapping[str, Arrays]
) -> Verdicts:
    """Per node: its update's scores, `flagged`, `excluded` and its reputation after the round."""
    detection = _detection(spec)
    nodes = sorted(deltas)
    scores = score_updates([deltas[n] for n in nodes], detection.threshold)
    flagged = [s.flagged for s in scores]
    leave_out = detection.exclude and not all(flagged)
    verdicts: Verdicts = {
        node: {**score.as_dict(), "excluded": leave_out and score.flagged}
        for node, score in zip(nodes, scores, strict=True)
    }
    step = partial(_step, decay=detection.reputation_decay)
    recorded, fresh = ctx.store.record_screening(spec.name, number, verdicts, step)
    if fresh:
        _audit_flags(ctx, spec, number, recorded, all_flagged=detection.exclude and all(flagged))
    return recorded


def _step(previous: float, flagged: bool, *, decay: float) -> float:
    return updated_reputation(previous, flagged, decay)


def _audit_flags(
    ctx: RoundContext, spec: StudySpec, number: int, verdicts: Verdicts, *, all_flagged: bool
) -> None:
    detection = _detection(spec)
    for node, verdict in sorted(verdicts.items()):
        if not verdict["flagged"]:
            continue
        details = {
            "node": node,
            "round": number,
            **{k: v for k, v in verdict.items() if k != "flagged"},
            "threshold": detection.threshold,
        }
        if all_flagged:
            details["kept_because"] = ALL_FLAGGED
        ctx.audit.append(
            "update.flagged",
            actor="hub",
            resource=f"study/{spec.name}/round/{number}",
            details=details,
        )


def admitted(ctx: RoundContext, spec: StudySpec, nodes: list[str]) -> list[str]:
    """The nodes whose reputation is at or above the study's floor; each other one audited."""
    if spec.detection is None:
        return nodes
    floor = spec.detection.reputation_floor
    kept = []
    for node in nodes:
        reputation = ctx.store.reputation(node)
        if reputation >= floor:
            kept.append(node)
            continue
        ctx.audit.append(
            "node.excluded",
            actor="hub",
            resource=f"node/{node}",
            details={
                "study": spec.name,
                "reputation": round(reputation, 6),
                "floor": floor,
                "until": "an admin runs `aipipe hub readmit`",
            },
        )
    return kept


def _detection(spec: StudySpec) -> Detection:
    assert spec.detection is not None  # screened only for a study with the block
    return spec.detection
