"""A node's sender per round kind, registered by the study's `secure:` mode (the node's side
of `aipipe.hub.rounds`): each takes the trained update to the hub its own way, through the
one upload path and the one training audit of `aipipe.node.sending`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import ClassVar

from aipipe.errors import StudyError
from aipipe.models.training import TrainResult
from aipipe.node import secure_rounds
from aipipe.node.sending import RoundNode, audit_train, upload
from aipipe.study.spec import StudySpec
from aipipe.wire import RoundWork, SecureMode
from aipipe.wire.tensors import encode_arrays


class Sender(ABC):
    mode: ClassVar[SecureMode]

    @abstractmethod
    def send(
        self,
        node: RoundNode,
        spec: StudySpec,
        item: RoundWork,
        train: Callable[[], TrainResult],
        epsilon: float | None,
        sigma: float | None,
    ) -> str:
        """Train (`train`) and take this round's contribution to the hub; a one-line summary."""


class PlainSender(Sender):
    mode = SecureMode.NONE

    def send(
        self,
        node: RoundNode,
        spec: StudySpec,
        item: RoundWork,
        train: Callable[[], TrainResult],
        epsilon: float | None,
        sigma: float | None,
    ) -> str:
        result = train()
        # A site larger than bounds.max_examples weighs as that many (the hub refuses more).
        weight = min(result.num_examples, spec.bounds.max_examples)
        norm = result.update_norm
        audit_train(
            node, spec, item.round, result.num_examples, epsilon, update_norm=round(norm, 6)
        )
        payload = encode_arrays(result.delta)
        receipt = upload(node, spec, item, payload, epsilon, n=weight, norm=norm)
        return (
            f"round {item.round}: sent update (n={result.num_examples}, "
            f"ε={epsilon if epsilon is None else round(epsilon, 3)}), round {receipt.round_state}"
        )


class SecAggSender(Sender):
    mode = SecureMode.SECAGG

    def send(
        self,
        node: RoundNode,
        spec: StudySpec,
        item: RoundWork,
        train: Callable[[], TrainResult],
        epsilon: float | None,
        sigma: float | None,
    ) -> str:
        return secure_rounds.secagg_round(node, spec, item, train, epsilon, sigma=sigma)


class CkksSender(Sender):
    mode = SecureMode.CKKS

    def send(
        self,
        node: RoundNode,
        spec: StudySpec,
        item: RoundWork,
        train: Callable[[], TrainResult],
        epsilon: float | None,
        sigma: float | None,
    ) -> str:
        return secure_rounds.ckks_round(node, spec, item, train, epsilon)


SENDERS: Mapping[SecureMode, Sender] = MappingProxyType(
    {s.mode: s for s in (PlainSender(), SecAggSender(), CkksSender())}
)


def sender_for(spec: StudySpec) -> Sender:
    try:
        return SENDERS[SecureMode(spec.secure)]
    except (KeyError, ValueError):
        raise StudyError(f"this node has no sender for secure: {spec.secure}") from None
