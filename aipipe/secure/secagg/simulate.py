"""Run a whole SecAgg+ round in one process: the reference order of calls, for tests and benches.

The hub and node wire the same calls over HTTP; here messages are handed over directly. Dropouts
are simulated by leaving a client out of a stage (it answers nothing from then on); a client that
gives up on its own (`SecAggRoundFailedError`: too few neighbours left) is a dropout too.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from contextlib import suppress
from dataclasses import dataclass, field

from aipipe.secure.errors import SecAggRoundFailedError
from aipipe.secure.identity import Identity
from aipipe.secure.secagg.client import SecAggClient
from aipipe.secure.secagg.crypto import UIntArray
from aipipe.secure.secagg.graph import SecAggConfig
from aipipe.secure.secagg.server import SecAggResult, SecAggServer


@dataclass(frozen=True)
class Dropouts:
    """Clients that stop answering before a stage: they never send that stage's message."""

    before_advertise: frozenset[str] = field(default_factory=frozenset)
    before_sharing: frozenset[str] = field(default_factory=frozenset)
    before_masking: frozenset[str] = field(default_factory=frozenset)
    before_unmasking: frozenset[str] = field(default_factory=frozenset)


def run_round(
    config: SecAggConfig,
    identities: Mapping[str, Identity],
    inputs: Mapping[str, UIntArray],
    dropouts: Dropouts | None = None,
) -> SecAggResult:
    """Every stage in order; raises what the server or a client raises."""
    drop = dropouts or Dropouts()
    roster = {c: identities[c].public_bytes for c in config.clients}
    server = SecAggServer(config=config, roster=roster)
    clients = {
        c: SecAggClient(config=config, client_id=c, identity=identities[c], roster=roster)
        for c in config.clients
    }
    for c in _alive(config.clients, drop.before_advertise):
        server.receive_advertisement(clients[c].advertise())
    for c in _alive(server.close_advertising(), drop.before_sharing):
        with suppress(SecAggRoundFailedError):
            server.receive_shares(clients[c].share_keys(server.neighbour_keys(c)))
    for c in _alive(server.close_sharing(), drop.before_masking):
        with suppress(SecAggRoundFailedError):
            server.receive_masked_input(clients[c].mask(server.forwarded_shares(c), inputs[c]))
    for c in _alive(server.close_masking(), drop.before_unmasking):
        with suppress(SecAggRoundFailedError):
            server.receive_unmask(clients[c].unmask(server.unmask_request(c)))
    return server.finish()


def _alive(clients: Collection[str], gone: frozenset[str]) -> list[str]:
    return [c for c in clients if c not in gone]
