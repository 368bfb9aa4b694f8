"""SecAgg+ rounds at the hub: relay keys and shares, sum masked inputs, unmask only the sum.

One `SecAggServer` (aipipe.secure.secagg) per round routes the protocol; this module gives it
stages with deadlines. A stage closes once every node still in the round has answered, or at
its deadline (`secure_options.stage_timeout_s`), and the nodes that did not answer count as
dropped — the protocol's own recovery (Shamir shares of the dropped nodes' mask keys) removes
their masks. The hub stores no masked input and no share in clear: the masked sum lives in the
server object, and only the unmasked *sum* of at least `min_nodes` inputs is ever decoded.

The masked sum and the nodes' per-round keys live in memory, on both sides; a hub restarted
mid-round therefore fails the round with a reason (a node restarted mid-round is a dropout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from aipipe.errors import ConflictError, NotFoundError
from aipipe.secure.encoding import fixed_point_codec
from aipipe.secure.errors import SecAggRoundFailedError, SecureAggregationError
from aipipe.secure.fixedpoint import FixedPointCodec
from aipipe.secure.secagg import MaskedInput, SecAggConfig, SecAggServer
from aipipe.wire import UpdateHeader
from aipipe.wire.secure import (
    SecAggAdvert,
    SecAggForwarded,
    SecAggNeighbourKeys,
    SecAggRoundConfig,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
)

if TYPE_CHECKING:
    from aipipe.hub.secure import SecureRounds
    from aipipe.study.spec import StudySpec

STAGES = ("advertising", "sharing", "masking", "unmasking")
_POSTS: dict[str, tuple[str, type[BaseModel]]] = {
    "advert": ("advertising", SecAggAdvert),
    "shares": ("sharing", SecAggShares),
    "unmask": ("unmasking", SecAggUnmask),
}
_POLLS = {"neighbour-keys": "sharing", "forwarded-shares": "masking", "unmask-request": "unmasking"}


@dataclass
class SecAggRound:
    """One round's protocol state: the server, who answered in the current stage, and what
    each node is to fetch next."""

    server: SecAggServer
    codec: FixedPointCodec
    stage: str
    deadline: datetime
    members: frozenset[str]
    answered: set[str] = field(default_factory=set)
    outbox: dict[str, BaseModel] = field(default_factory=dict)


def round_config(
    spec: StudySpec, number: int, base: str, clients: list[str], size: int
) -> SecAggConfig:
    options = spec.secure_options
    return SecAggConfig.create(
        round_id=f"{spec.name}/{number}/{base[:16]}",
        clients=clients,
        vector_length=size,
        bits=options.bits,
        neighbours=options.neighbours,
        threshold=options.threshold,
    )


class SecAggRounds:
    def __init__(self, secure: SecureRounds) -> None:
        self._secure = secure
        self._rounds: dict[tuple[str, int], SecAggRound] = {}

    def open(self, spec: StudySpec, number: int, base: str, selected: list[str]) -> None:
        service = self._secure.service
        size = self._secure.layout(base).size
        config = round_config(spec, number, base, selected, size)
        roster = {r["name"]: bytes.fromhex(r["public_key"]) for r in service.store.nodes()}
        server = SecAggServer(
            config=config, roster=roster, seen_public_keys=self._secure.store.seen_keys()
        )
        self._rounds[(spec.name, number)] = SecAggRound(
            server,
            fixed_point_codec(spec.secure_options.update_clip, len(config.clients), config.bits),
            "",
            self._secure.now(),
            frozenset(selected),
        )
        self._enter(spec, number, "advertising", frozenset(selected))

    def _enter(self, spec: StudySpec, number: int, stage: str, members: frozenset[str]) -> None:
        state = self._rounds[(spec.name, number)]
        state.stage, state.members, state.answered = stage, members, set()
        state.deadline = self._secure.stage_deadline(spec, number)
        self._secure.store.set_stage(spec.name, number, stage, self._secure.iso(state.deadline))

    def _get(self, study: str, number: int) -> SecAggRound:
        state = self._rounds.get((study, number))
        if state is None:
            raise ConflictError(f"round {number} of '{study}' has no SecAgg+ round in progress")
        return state

    def config(self, study: str, number: int, node: str) -> SecAggRoundConfig:
        cfg = self._get(study, number).server.config
        if node not in cfg.clients:
            raise ConflictError(f"node '{node}' was not selected for round {number} of '{study}'")
        return SecAggRoundConfig(
            round_id=cfg.round_id,
            clients=list(cfg.clients),
            vector_length=cfg.vector_length,
            neighbours=cfg.neighbours,
            threshold=cfg.threshold,
            bits=32 if cfg.bits == 32 else 64,
        )

    def wants_advert(self, study: str, number: int, node: str) -> bool:
        state = self._rounds.get((study, number))
        return state is not None and state.stage == "advertising" and node not in state.answered

    # -- node → hub ----------------------------------------------------------------------------

    def post(self, spec: StudySpec, number: int, node: str, step: str, body: bytes) -> None:
        if step not in _POSTS:
            raise NotFoundError(f"no SecAgg+ step '{step}'; nodes post {', '.join(_POSTS)}")
        stage, model = _POSTS[step]
        state = self._get(spec.name, number)
        self._check_member(state, node, stage, step)
        try:
            message = model.model_validate_json(body)
        except ValidationError as exc:
            self._secure.refuse(node, spec.name, number, f"malformed {step}: {exc.errors()[0]}")
        inner = getattr(message, "advert", None) or getattr(message, "reply", None)
        if getattr(inner, "client_id", None) != node:
            self._secure.refuse(node, spec.name, number, f"{step} names another sender")
        try:
            if isinstance(message, SecAggAdvert):
                state.server.receive_advertisement(message.advert)
            elif isinstance(message, SecAggShares):
                state.server.receive_shares(message.reply)
            elif isinstance(message, SecAggUnmask):
                state.server.receive_unmask(message.reply)
        except SecureAggregationError as exc:
            self._secure.refuse(node, spec.name, number, f"{step}: {exc}")
        state.answered.add(node)
        self.advance(spec, number)

    def _check_member(self, state: SecAggRound, node: str, stage: str, step: str) -> None:
        if state.stage != stage:
            raise ConflictError(f"{step} is refused: the round is {state.stage}, not {stage}")
        if node not in state.members:
            raise ConflictError(f"node '{node}' is not in the {stage} stage (counted as dropped)")
        if node in state.answered:
            raise ConflictError(f"node '{node}' already answered the {stage} stage")

    def masked_input(self, spec: StudySpec, header: UpdateHeader, payload: bytes) -> None:
        """Fold a signed masked input, recording it in the same store transaction."""
        number, node = header.round, header.node
        state = self._get(spec.name, number)
        self._check_member(state, node, "masking", "masked input")
        round_id = state.server.config.round_id

        def fold(previous: bytes | None) -> None:
            state.server.receive_masked_input(MaskedInput(round_id, node, payload))

        try:
            self._secure.record_update(spec.name, header, fold)
        except SecureAggregationError as exc:
            self._secure.refuse(node, spec.name, number, str(exc))
        state.answered.add(node)
        self.advance(spec, number)

    # -- hub → node ----------------------------------------------------------------------------

    def poll(self, study: str, number: int, node: str, step: str) -> BaseModel | None:
        """What `node` fetches at `step`, or None while the stage before is still open."""
        if step not in _POLLS:
            raise NotFoundError(f"no SecAgg+ step '{step}'; nodes fetch {', '.join(_POLLS)}")
        row = self._secure.service.store.round(study, number)
        if row is not None and row.state == "failed":
            raise ConflictError(f"round {number} of '{study}' failed: {row.reason}")
        state = self._rounds.get((study, number))
        if state is None:
            raise ConflictError(f"round {number} of '{study}' has no SecAgg+ round in progress")
        wanted = _POLLS[step]
        if STAGES.index(state.stage) < STAGES.index(wanted):
            return None
        if state.stage != wanted or node not in state.outbox:
            raise ConflictError(f"nothing for '{node}' at {step}: it was counted as dropped")
        return state.outbox[node]

    # -- stages --------------------------------------------------------------------------------

    def advance(self, spec: StudySpec, number: int) -> None:
        """Close the current stage if everyone answered or its deadline passed."""
        state = self._rounds.get((spec.name, number))
        if state is None:
            return
        declined = self._secure.declined(spec.name, number)
        waiting = state.members - state.answered - declined
        if waiting and self._secure.now() < state.deadline:
            return
        server = state.server
        try:
            if state.stage == "advertising":
                members = server.close_advertising()
                self._secure.store.add_seen_keys(server.used_public_keys)
                state.outbox = {
                    c: SecAggNeighbourKeys(keys=server.neighbour_keys(c)) for c in members
                }
                self._closed(spec, number, state, "sharing", members)
            elif state.stage == "sharing":
                members = server.close_sharing()
                state.outbox = {
                    c: SecAggForwarded(shares=server.forwarded_shares(c)) for c in members
                }
                self._closed(spec, number, state, "masking", members)
            elif state.stage == "masking":
                members = server.close_masking()
                self._secure.need_min_nodes(spec, len(members), "masked inputs")
                state.outbox = {
                    c: SecAggUnmaskRequest(request=server.unmask_request(c)) for c in members
                }
                self._closed(spec, number, state, "unmasking", members)
            else:
                result = server.finish()
                self._rounds.pop((spec.name, number))
                total = state.codec.decode_sum(result.total, len(result.contributors))
                self._secure.finish(spec, number, total, list(result.contributors))
        except SecAggRoundFailedError as exc:
            self._rounds.pop((spec.name, number), None)
            self._secure.fail(spec.name, number, str(exc))

    def _closed(
        self, spec: StudySpec, number: int, state: SecAggRound, stage: str, members: tuple[str, ...]
    ) -> None:
        dropped = sorted(state.members - set(members))
        self._secure.audit_stage(spec.name, number, state.stage, len(members), dropped)
        self._enter(spec, number, stage, frozenset(members))

    def forget(self, study: str, number: int) -> None:
        self._rounds.pop((study, number), None)

    def running(self, study: str, number: int) -> bool:
        return (study, number) in self._rounds
