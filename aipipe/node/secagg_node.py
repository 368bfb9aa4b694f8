"""A node's side of one SecAgg+ round, resumable: after a hub or node restart it goes on.

Steps, in order; each message is made once, sealed into the round's state on disk
(`aipipe.node.round_state`) and only then sent, so after a restart the node re-sends the
very same bytes (the hub answers an identical re-send with OK) and never makes a second,
different message for a stage:

    advert   → wait neighbour-keys → shares → wait forwarded-shares → train → masked
             → wait unmask-request → unmask

An unreachable hub (refused or reset connections, 502–504) is retried, not given up on: a post
or fetch for `stage_timeout_s` (the hub waits that long per stage), a long-poll until the
round's deadline. A hub answer that ends the round for this node (a 4xx: round failed, counted
as dropped, message refused) ends it at once. Whatever the outcome, the state is deleted once
the round ends for this node; only a process that dies keeps it, for `resume_secagg`.

ε: the worker charges the round before `run_secagg`; resuming a saved round never charges
again. A node restarted before its masked input left trains again (with fresh noise), since the
first result was never released.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel

from aipipe.node.round_state import RoundStates, SecAggRoundState
from aipipe.node.sending import (
    RoundNode,
    base_layout,
    charged_frame,
    recorded_contribution,
    round_deadline,
    vault_of,
)
from aipipe.secure.encoding import fixed_point_codec
from aipipe.secure.errors import SecAggProtocolError
from aipipe.secure.secagg import SecAggClient, SecAggConfig, default_threshold
from aipipe.wire.secure import (
    SecAggAdvert,
    SecAggForwarded,
    SecAggNeighbourKeys,
    SecAggRoundConfig,
    SecAggShares,
    SecAggStep,
    SecAggUnmask,
    SecAggUnmaskRequest,
)

if TYPE_CHECKING:
    from aipipe.models.training import TrainResult
    from aipipe.study.spec import StudySpec


def checked_config(
    spec: StudySpec, message: SecAggRoundConfig, me: str, number: int, size: int
) -> SecAggConfig:
    """The hub's round config, refused unless it is the one this node's study implies."""
    config = SecAggConfig(
        message.round_id,
        tuple(message.clients),
        message.vector_length,
        message.neighbours,
        message.threshold,
        message.bits,
    )
    options, k = spec.secure_options, config.neighbours
    wanted_t = options.threshold or default_threshold(k)
    problems = [
        why
        for why, bad in (
            ("it is for another round", not config.round_id.startswith(f"{spec.name}/{number}/")),
            ("this node is not in it", me not in config.clients),
            (
                f"it has fewer than min_nodes={spec.min_nodes} nodes",
                len(config.clients) < spec.min_nodes,
            ),
            (f"its vectors are not {size} long", config.vector_length != size),
            (f"it uses {config.bits}-bit words", config.bits != options.bits),
            (f"threshold t={config.threshold} is below {wanted_t}", config.threshold < wanted_t),
            (
                f"k={k} neighbours differs from the study's",
                options.neighbours is not None and k != options.neighbours,
            ),
        )
        if bad
    ]
    if problems:
        raise SecAggProtocolError(f"refusing the hub's SecAgg+ round: {'; '.join(problems)}")
    return config


_M = TypeVar("_M", bound=BaseModel)


def run_secagg(
    worker: RoundNode,
    spec: StudySpec,
    state: SecAggRoundState,
    train: Callable[[], TrainResult],
) -> str:
    """Run (or resume) the round to its end for this node; delete its state once it ends."""
    states = RoundStates(vault_of(worker))
    try:
        summary = _Round(worker, spec, state, states, train).run()
    except Exception:
        # Any outcome but the process dying ends the round for this node; a BaseException
        # (KeyboardInterrupt, SystemExit) keeps the state, as a crash does, for the next start.
        states.delete(state.study, state.number)
        raise
    states.delete(state.study, state.number)
    return summary


class _Round:
    def __init__(
        self,
        worker: RoundNode,
        spec: StudySpec,
        state: SecAggRoundState,
        states: RoundStates,
        train: Callable[[], TrainResult],
    ) -> None:
        self.worker, self.spec, self.state, self.states, self.train = (
            worker,
            spec,
            state,
            states,
            train,
        )
        self.client = worker.client
        self.until = round_deadline(state.item)

    # -- retry windows -------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """A post or fetch: retry an unreachable hub for one stage's timeout."""
        window = time.monotonic() + self.spec.secure_options.stage_timeout_s
        with self.client.retrying_until(min(window, self.until)):
            yield

    def _save(self, **changes: object) -> None:
        self.state = self.state.model_copy(update=changes)
        self.states.save(self.state)

    # -- the round -----------------------------------------------------------------------

    def run(self) -> str:
        protocol = self._protocol()
        study, number, sent = self.state.study, self.state.number, self.state.sent
        if "shares" not in sent:
            with self._step():
                self.client.secagg_post(
                    study, number, "advert", SecAggAdvert.model_validate_json(sent["advert"])
                )
            keys = self._wait("neighbour-keys", SecAggNeighbourKeys)
            reply = SecAggShares(reply=protocol.share_keys(keys.keys))
            self._save(client=protocol.state(), sent={**sent, "shares": _json(reply)})
            sent = self.state.sent
        with self._step():
            self.client.secagg_post(
                study, number, "shares", SecAggShares.model_validate_json(sent["shares"])
            )
        if "masked" not in sent:
            neighbours = len(protocol.state().adverts)
            self.worker.log(f"round {number}: shared keys with {neighbours} neighbours")
            self._mask(protocol)
            sent = self.state.sent
        with self._step():
            self.client.upload(study, number, sent["masked"])
        if "unmask" not in sent:
            self.worker.log(f"round {number}: sent masked update")
            self._unmask(protocol)
            sent = self.state.sent
        with self._step():
            self.client.secagg_post(
                study, number, "unmask", SecAggUnmask.model_validate_json(sent["unmask"])
            )
        return (
            f"round {number}: secagg update sent and unmasked with {self.state.survivors} survivors"
        )

    def _protocol(self) -> SecAggClient:
        """The round's protocol client: new (keys made, advert sealed) or restored."""
        worker, spec, state = self.worker, self.spec, self.state
        layout = base_layout(worker, spec, state.item)
        with self._step():
            if state.config is None:
                message = worker.client.secagg_config(state.study, state.number)
            else:
                message = state.config
            config = checked_config(spec, message, worker.name, state.number, layout.size)
            roster = {e.node: e.identity_key for e in worker.client.keyring().nodes}
        if state.client is not None:
            return SecAggClient.restore(
                state.client,
                config=config,
                client_id=worker.name,
                identity=worker.identity,
                roster=roster,
            )
        protocol = SecAggClient(
            config=config, client_id=worker.name, identity=worker.identity, roster=roster
        )
        advert = SecAggAdvert(advert=protocol.advertise())
        self._save(config=message, client=protocol.state(), sent={"advert": _json(advert)})
        return protocol

    def _wait(self, step: SecAggStep, model: type[_M]) -> _M:
        with self.client.retrying_until(self.until):
            return self.client.secagg_wait(
                self.state.study, self.state.number, step, model, until=self.until
            )

    def _mask(self, protocol: SecAggClient) -> None:
        worker, spec, state = self.worker, self.spec, self.state
        forwarded = self._wait("forwarded-shares", SecAggForwarded)
        layout = base_layout(worker, spec, state.item)
        x = recorded_contribution(worker, spec, state.item, self.train(), layout, state.epsilon)
        clients = len(protocol.config.clients)
        codec = fixed_point_codec(spec.bounds.update_norm, clients, protocol.config.bits)
        masked = protocol.mask(forwarded.shares, codec.encode(x))
        # Charged before it is saved: a saved masked input is only ever one already charged.
        body = charged_frame(worker, spec, state.item, masked.data, state.epsilon)
        self._save(client=protocol.state(), sent={**state.sent, "masked": body})

    def _unmask(self, protocol: SecAggClient) -> None:
        spec, config = self.spec, protocol.config
        request = self._wait("unmask-request", SecAggUnmaskRequest)
        survivors = len(request.request.survivors)
        if survivors < min(spec.min_nodes, config.neighbours + 1):
            raise SecAggProtocolError(
                f"the hub asks to unmask a sum of {survivors} inputs; study '{spec.name}' needs "
                f"min_nodes={spec.min_nodes}, so this node reveals nothing"
            )
        reply = SecAggUnmask(reply=protocol.unmask(request.request))
        # Sealed before it leaves: a restarted node re-sends this reply and never answers a
        # second unmask request, which could reveal both shares of a neighbour.
        self._save(
            client=protocol.state(),
            sent={**self.state.sent, "unmask": _json(reply)},
            survivors=survivors,
        )


def _json(message: BaseModel) -> bytes:
    return message.model_dump_json().encode()
