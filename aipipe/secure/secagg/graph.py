"""Round configuration for SecAgg+: who takes part, the neighbour graph, and the threshold t.

Neighbour graph (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS; §3 replaces Bonawitz et al.'s complete graph by a sparse random graph of degree
k = O(log n)). Here:

- n ≤ 10: the complete graph, k = n − 1 (that is Bonawitz et al. 2017);
- larger n: a Harary graph H(k, n) on a pseudorandom ring. The clients are ordered by
  SHA-256(round seed ‖ client id) and each is joined to the k/2 clients before and after it,
  which is exactly k-regular for even k (as in Flower's SecAgg+ workflow). The ordering is a
  pure function of (round id, selected clients), so every client recomputes its own neighbour
  set and the server cannot pick neighbourhoods.

Default degree for n > 10: k = 2·⌈2·log2 n⌉ (even; 24 at n = 50, 40 at n = 1000), capped at
n − 1. Bell et al. derive the exact degree from the tolerated corruption and dropout rates and
two security parameters; this default is an O(log n) heuristic, not derived from their bounds:
set k per study where the consortium's dropout and corruption rates are known.

Threshold. Each client splits its secrets among its m = k + 1 holders (its k neighbours and
itself, as Flower does). Default t = ⌊2m/3⌋ + 1, i.e. t > 2m/3. A server that lies about who
dropped, helped by c corrupt holders, collects t shares of both secrets of one client unless
2t > m + c (Bonawitz et al. 2017, §6: against an active server they take t > 2n/3 with fewer
than n/3 corrupt users); the design's threat model allows up to a third of the nodes to be
malicious (c < m/3). Values down to t > m/2 (enough against an honest-but-curious server) may
be set explicitly; lower ones are refused.

A neighbourhood survives up to m − t dropouts after key sharing; with the complete graph
(m = n) the round survives n − t dropouts. n = 4 → t = 3 (1 dropout); n = 10 → t = 7 (3).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

from aipipe.secure._framing import frame
from aipipe.secure.errors import SecAggProtocolError

COMPLETE_GRAPH_MAX = 10
_GRAPH_LABEL = b"aipipe/secagg/graph/v1"


def default_neighbours(n: int) -> int:
    """k: n − 1 up to 10 clients, else the even 2·⌈2·log2 n⌉ capped at n − 1."""
    if n <= COMPLETE_GRAPH_MAX:
        return n - 1
    return min(n - 1, 2 * math.ceil(2 * math.log2(n)))


def default_threshold(neighbours: int) -> int:
    """t = ⌊2m/3⌋ + 1 with m = k + 1 holders: strictly more than two thirds of them."""
    return 2 * (neighbours + 1) // 3 + 1


def minimum_threshold(neighbours: int) -> int:
    """The smallest t accepted: a strict majority of the m = k + 1 holders, and at least 2."""
    return max(2, (neighbours + 1) // 2 + 1)


@dataclass(frozen=True)
class SecAggConfig:
    """What the server announces when it opens a SecAgg+ round; every client checks it."""

    round_id: str
    clients: tuple[str, ...]
    vector_length: int
    neighbours: int
    threshold: int
    bits: int = 32

    @classmethod
    def create(
        cls,
        *,
        round_id: str,
        clients: tuple[str, ...] | list[str],
        vector_length: int,
        bits: int = 32,
        neighbours: int | None = None,
        threshold: int | None = None,
    ) -> SecAggConfig:
        """Sorted clients, default k and t where not given, validated."""
        ordered = tuple(sorted(clients))
        k = default_neighbours(len(ordered)) if neighbours is None else neighbours
        t = default_threshold(k) if threshold is None else threshold
        return cls(round_id, ordered, vector_length, k, t, bits)

    def __post_init__(self) -> None:
        n, k, t = len(self.clients), self.neighbours, self.threshold
        problems = []
        if n < 3:
            problems.append(f"{n} clients: a sum of fewer than 3 reveals the others' inputs")
        if len(set(self.clients)) != n or list(self.clients) != sorted(self.clients):
            problems.append("clients must be unique and sorted")
        if self.bits not in (32, 64):
            problems.append(f"bits must be 32 or 64, got {self.bits}")
        if self.vector_length < 1:
            problems.append(f"vector_length must be positive, got {self.vector_length}")
        if not (k == n - 1 or (2 <= k < n - 1 and k % 2 == 0)):
            problems.append(f"k={k} neighbours: use n − 1 = {n - 1} or an even k < {n - 1}")
        elif not minimum_threshold(k) <= t <= k + 1:
            problems.append(
                f"threshold t={t} must lie in [{minimum_threshold(k)}, {k + 1}] for k={k} "
                f"(default {default_threshold(k)})"
            )
        if problems:
            raise SecAggProtocolError(f"round {self.round_id!r}: " + "; ".join(problems))

    @property
    def word_bytes(self) -> int:
        return self.bits // 8

    @cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        return neighbour_graph(self.round_id, self.clients, self.neighbours)

    def holders(self, client: str) -> tuple[str, ...]:
        """Holders of `client`'s shares: its neighbours and itself, sorted; x = position + 1."""
        return tuple(sorted(self.graph[client] | {client}))


def neighbour_graph(round_id: str, clients: tuple[str, ...], k: int) -> dict[str, frozenset[str]]:
    """Undirected k-regular graph over `clients`: complete if k = n − 1, else Harary H(k, n)."""
    n = len(clients)
    if k == n - 1:
        return {c: frozenset(clients) - {c} for c in clients}
    seed = hashlib.sha256(frame(_GRAPH_LABEL, round_id, *sorted(clients))).digest()
    ring = sorted(clients, key=lambda c: hashlib.sha256(seed + c.encode()).digest())
    half = k // 2
    return {
        c: frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d != 0)
        for i, c in enumerate(ring)
    }
