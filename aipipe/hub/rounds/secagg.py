"""SecAgg+ rounds at the hub: relay keys and shares, sum masked inputs, unmask only the sum.

One `SecAggServer` (aipipe.secure.secagg) per round routes the protocol; this module gives it
stages with deadlines. A stage closes once every node still in the round has answered, or at
its deadline (`secure_options.stage_timeout_s`), and the nodes that did not answer count as
dropped — the protocol's own recovery (Shamir shares of the dropped nodes' mask keys) removes
their masks. Only the unmasked *sum* of at least `min_nodes` inputs is ever decoded.

Every message the server accepted, and every stage it closed, is appended to the round's log in
`SecureStore` in the transaction that accepts it. The server is a deterministic function of
that log, so a hub restarted mid-round rebuilds it by replaying the log and the round goes on
(nodes retry while the hub is away, for a stage's timeout). A node that re-sends a message the
log already holds from it, having lost the answer to the restart, gets OK; a different message
for a step it answered is refused. The log holds what the hub already sees: signed public
keys, shares encrypted node to node, masked inputs, and the shares revealed for unmasking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, ValidationError

from aipipe.errors import ConflictError, NotFoundError, RefusalCategory
from aipipe.hub.rounds.context import NodeStatus, RoundContext
from aipipe.hub.rounds.secure_sum import SecureProtocol
from aipipe.secure.encoding import FloatArray, fixed_point_codec
from aipipe.secure.errors import SecureAggregationError
from aipipe.secure.fixedpoint import FixedPointCodec
from aipipe.secure.secagg import MaskedInput, SecAggConfig, SecAggServer, SecAggStage
from aipipe.store.hub_rounds import RoundRow
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundState, RoundWork, SecureMode, UpdateHeader
from aipipe.wire.secure import (
    SecAggAdvert,
    SecAggForwarded,
    SecAggNeighbourKeys,
    SecAggRoundConfig,
    SecAggShares,
    SecAggUnmask,
    SecAggUnmaskRequest,
)

_NEXT = {SecAggStage.ADVERTISING: SecAggStage.SHARING, SecAggStage.SHARING: SecAggStage.MASKING}
_NEXT[SecAggStage.MASKING] = SecAggStage.UNMASKING
_POSTS: dict[str, tuple[SecAggStage, type[BaseModel]]] = {
    "advert": (SecAggStage.ADVERTISING, SecAggAdvert),
    "shares": (SecAggStage.SHARING, SecAggShares),
    "unmask": (SecAggStage.UNMASKING, SecAggUnmask),
}
_POLLS = {
    "neighbour-keys": SecAggStage.SHARING,
    "forwarded-shares": SecAggStage.MASKING,
    "unmask-request": SecAggStage.UNMASKING,
}
_ORDER = list(SecAggStage)
_LIVE = frozenset(_ORDER) - {SecAggStage.DONE}
_CLOSE = "close"


@dataclass
class SecAggState:
    """One round's protocol state: the server, who answered in the current stage, and what
    each node is to fetch next."""

    server: SecAggServer
    codec: FixedPointCodec
    stage: SecAggStage
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


def _apply(state: SecAggState, kind: str, node: str, body: bytes) -> None:
    """Feed one logged message (or stage close) to the round: the same code live and replayed."""
    server = state.server
    if kind == _CLOSE:
        _close(state)
        return
    if kind == "advert":
        server.receive_advertisement(SecAggAdvert.model_validate_json(body).advert)
    elif kind == "shares":
        server.receive_shares(SecAggShares.model_validate_json(body).reply)
    elif kind == "masked":
        server.receive_masked_input(MaskedInput(server.config.round_id, node, body))
    else:
        server.receive_unmask(SecAggUnmask.model_validate_json(body).reply)
    state.answered.add(node)


def _close(state: SecAggState) -> SecAggStage:
    """End the current stage: the next stage's members and what each of them fetches."""
    server = state.server
    outbox: dict[str, BaseModel]
    if state.stage is SecAggStage.ADVERTISING:
        members = server.close_advertising()
        outbox = {c: SecAggNeighbourKeys(keys=server.neighbour_keys(c)) for c in members}
    elif state.stage is SecAggStage.SHARING:
        members = server.close_sharing()
        outbox = {c: SecAggForwarded(shares=server.forwarded_shares(c)) for c in members}
    else:
        members = server.close_masking()
        outbox = {c: SecAggUnmaskRequest(request=server.unmask_request(c)) for c in members}
    state.stage = _NEXT[state.stage]
    state.members, state.answered, state.outbox = frozenset(members), set(), outbox
    return state.stage


class SecAggRound(SecureProtocol):
    """SecAgg+ (Bell et al. 2020) at the hub, stage by stage as Flower's SecAgg+ workflow."""

    mode = SecureMode.SECAGG

    def __init__(self, ctx: RoundContext) -> None:
        super().__init__(ctx)
        self._rounds: dict[tuple[str, int], SecAggState] = {}

    def _new(self, spec: StudySpec, number: int, *, replay: bool) -> SecAggState:
        ctx = self.ctx
        row = ctx.round_row(spec.name, number)
        selected = self.selected(spec.name, number)
        config = round_config(
            spec, number, row.base_version, selected, self.layout(spec, row.base_version).size
        )
        roster = {r["name"]: bytes.fromhex(r["public_key"]) for r in ctx.store.nodes()}
        seen = ctx.secure.seen_keys(exclude_round=config.round_id if replay else None)
        server = SecAggServer(config=config, roster=roster, seen_public_keys=seen)
        codec = fixed_point_codec(spec.bounds.update_norm, len(selected), config.bits)
        return SecAggState(
            server, codec, SecAggStage.ADVERTISING, ctx.clock.now(), frozenset(selected)
        )

    def open(self, spec: StudySpec, number: int) -> None:
        try:
            state = self._rounds[(spec.name, number)] = self._new(spec, number, replay=False)
        except SecureAggregationError as exc:
            self.fail(spec.name, number, str(exc))
            return
        state.deadline = self.stage_deadline(spec, number)
        self._set_stage(spec, number, state)

    def _set_stage(self, spec: StudySpec, number: int, state: SecAggState) -> None:
        iso = self.ctx.clock.iso(state.deadline)
        self.ctx.secure.set_stage(spec.name, number, state.stage, iso)

    def _get(self, spec: StudySpec, number: int) -> SecAggState:
        """The round in memory, or rebuilt from its log after a hub restart."""
        state = self._rounds.get((spec.name, number))
        if state is not None:
            return state
        found = self.ctx.secure.stage(spec.name, number)
        if found is None or found[0] not in _LIVE:
            raise ConflictError(f"round {number} of '{spec.name}' has no SecAgg+ round in progress")
        state = self._new(spec, number, replay=True)
        try:
            for kind, node, body in self.ctx.secure.secagg_log(spec.name, number):
                _apply(state, kind, node, body)
        except (SecureAggregationError, ValidationError) as exc:
            why = f"the SecAgg+ round could not be rebuilt from its log: {exc}"
            self.fail(spec.name, number, why)
            raise ConflictError(why) from exc
        state.deadline = self.ctx.clock.parse(found[1])
        self._rounds[(spec.name, number)] = state
        return state

    def config(self, spec: StudySpec, number: int, node: str) -> SecAggRoundConfig:
        cfg = self._get(spec, number).server.config
        if node not in cfg.clients:
            raise ConflictError(
                f"node '{node}' was not selected for round {number} of '{spec.name}'"
            )
        return SecAggRoundConfig(
            round_id=cfg.round_id,
            clients=list(cfg.clients),
            vector_length=cfg.vector_length,
            neighbours=cfg.neighbours,
            threshold=cfg.threshold,
            bits=32 if cfg.bits == 32 else 64,
        )

    def work(self, spec: StudySpec, row: RoundRow, node: str, digest: str) -> RoundWork | None:
        """A node trains once asked to advertise its keys; the other stages it polls for."""
        try:
            state = self._get(spec, row.round)
        except ConflictError:
            return None
        if state.stage is SecAggStage.ADVERTISING and node not in state.answered:
            return self.work_item("train", spec, row, digest)
        return None

    # -- node → hub ----------------------------------------------------------------------------

    def post(self, spec: StudySpec, number: int, node: str, step: str, body: bytes) -> None:
        if step not in _POSTS:
            raise NotFoundError(f"no SecAgg+ step '{step}'; nodes post {', '.join(_POSTS)}")
        stage, model = _POSTS[step]
        kind = "advert" if stage is SecAggStage.ADVERTISING else step
        if self._resent(spec, number, node, kind, body):
            return
        state = self._get(spec, number)
        self._check_member(spec, number, state, node, stage, step)
        refuse = self.ctx.refuse
        try:
            message = model.model_validate_json(body)
        except ValidationError as exc:
            refuse(node, spec.name, number, f"malformed {step}: {exc.errors()[0]}")
        inner = getattr(message, "advert", None) or getattr(message, "reply", None)
        if getattr(inner, "client_id", None) != node:
            refuse(node, spec.name, number, f"{step} names another sender")
        try:
            with self.ctx.store.transaction():
                self.ctx.secure.log_secagg(spec.name, number, kind, node, body)
                _apply(state, kind, node, body)
        except SecureAggregationError as exc:
            refuse(node, spec.name, number, f"{step}: {exc}")
        self.advance(spec, number)

    def _resent(self, spec: StudySpec, number: int, node: str, kind: str, body: bytes) -> bool:
        """True for a node re-sending what the round's log already holds from it (a node that
        lost the hub's answer to a restart sends its message again): accepted, changing
        nothing. A different message for a step the node already answered is refused."""
        logged = self.ctx.secure.logged_message(spec.name, number, kind, node)
        if logged is None:
            return False
        if logged != body:
            self.ctx.refuse(
                node,
                spec.name,
                number,
                f"{kind} is refused: node '{node}' already sent a different {kind} this round",
                "duplicate",
            )
        return True

    def _check_member(
        self,
        spec: StudySpec,
        number: int,
        state: SecAggState,
        node: str,
        stage: SecAggStage,
        step: str,
    ) -> None:
        """Refuse, and audit, a message out of stage, from a dropped node, or repeated."""
        reason = None
        category: RefusalCategory = "protocol"
        if state.stage is not stage:
            reason = f"{step} is refused: the round is {state.stage}, not {stage}"
        elif node not in state.members:
            reason = f"{step} is refused: node '{node}' was counted as dropped before {stage}"
        elif node in state.answered:
            reason = f"{step} is refused: node '{node}' already answered the {stage} stage"
            category = "duplicate"
        if reason is not None:
            self.ctx.refuse(node, spec.name, number, reason, category)

    def take(self, spec: StudySpec, header: UpdateHeader, payload: bytes) -> None:
        """Fold a signed masked input, logging and recording it in one store transaction."""
        number, node = header.round, header.node
        if self._resent(spec, number, node, "masked", payload):
            return
        state = self._get(spec, number)
        self._check_member(spec, number, state, node, SecAggStage.MASKING, "masked input")

        def fold(previous: bytes | None) -> None:
            self.ctx.secure.log_secagg(spec.name, number, "masked", node, payload)
            _apply(state, "masked", node, payload)

        self.record(header, fold)
        self.advance(spec, number)

    # -- hub → node ----------------------------------------------------------------------------

    def poll(self, spec: StudySpec, number: int, node: str, step: str) -> BaseModel | None:
        """What `node` fetches at `step`, or None while the stage before is still open."""
        if step not in _POLLS:
            raise NotFoundError(f"no SecAgg+ step '{step}'; nodes fetch {', '.join(_POLLS)}")
        row = self.ctx.round_row(spec.name, number)
        if RoundState(row.state) is RoundState.FAILED:
            raise ConflictError(f"round {number} of '{spec.name}' failed: {row.reason}")
        state = self._get(spec, number)
        wanted = _POLLS[step]
        if _ORDER.index(state.stage) < _ORDER.index(wanted):
            return None
        if state.stage is not wanted or node not in state.outbox:
            raise ConflictError(f"nothing for '{node}' at {step}: it was counted as dropped")
        return state.outbox[node]

    # -- stages --------------------------------------------------------------------------------

    def advance(self, spec: StudySpec, number: int) -> None:
        """Close the current stage if everyone answered or its deadline passed."""
        if self.ctx.state(spec.name, number) in (None, RoundState.CLOSED, RoundState.FAILED):
            return
        try:
            state = self._get(spec, number)
        except ConflictError:
            return  # no round in progress (closed, failed, or a log that did not replay)
        try:
            self._step(spec, number, state)
        except SecureAggregationError as exc:  # too few left, or a malformed input in the sum
            self.fail(spec.name, number, str(exc))

    def _step(self, spec: StudySpec, number: int, state: SecAggState) -> None:
        ctx = self.ctx
        declined = set(ctx.with_status(spec.name, number, NodeStatus.DECLINED))
        if state.members - state.answered - declined and ctx.clock.now() < state.deadline:
            return
        if state.stage is SecAggStage.UNMASKING:
            self.conclude(spec, number)
            return
        before, closing = state.members, state.stage
        with ctx.store.transaction():
            ctx.secure.log_secagg(spec.name, number, _CLOSE, "hub", b"")
            opened = _close(state)
        if opened is SecAggStage.SHARING:
            ctx.secure.add_seen_keys(state.server.used_public_keys, state.server.config.round_id)
        if opened is SecAggStage.UNMASKING:
            self.need_min_nodes(spec, len(state.members), "masked inputs")
        dropped = sorted(before - state.members)
        self.audit_stage(spec.name, number, closing, len(state.members), dropped)
        state.deadline = self.stage_deadline(spec, number)
        self._set_stage(spec, number, state)

    def decoded_sum(self, spec: StudySpec, number: int) -> tuple[FloatArray, list[str]]:
        state = self._rounds.pop((spec.name, number))
        result = state.server.finish()
        total = state.codec.decode_sum(result.total, len(result.contributors))
        return total, list(result.contributors)

    def fail(self, study: str, number: int, reason: str) -> None:
        self._rounds.pop((study, number), None)
        super().fail(study, number, reason)
