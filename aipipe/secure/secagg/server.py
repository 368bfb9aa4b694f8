"""The server's side of one SecAgg+ round: routes messages, sums masked inputs, removes the masks.

    server = SecAggServer(config=cfg, roster=roster, seen_public_keys=ledger)
    for a in adverts: server.receive_advertisement(a)
    for c in server.close_advertising(): send(c, server.neighbour_keys(c))
    for r in share_replies: server.receive_shares(r)
    for c in server.close_sharing(): send(c, server.forwarded_shares(c))
    for m in masked_inputs: server.receive_masked_input(m)
    for c in server.close_masking(): send(c, server.unmask_request(c))
    for r in unmask_replies: server.receive_unmask(r)
    result = server.finish()          # Σ x_u mod 2^bits over result.contributors only

`close_*` ends a stage (at the deadline, or once everyone answered); late messages are refused.
Sets follow Bonawitz et al. 2017: U1 advertised keys, U2 shared them, U3 sent a masked input.
The masked sum is folded as inputs arrive, so memory is O(vector length), not O(clients).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aipipe.secure.errors import SecAggProtocolError, SecAggRoundFailedError
from aipipe.secure.secagg import crypto
from aipipe.secure.secagg.crypto import UIntArray
from aipipe.secure.secagg.graph import SecAggConfig
from aipipe.wire.secagg_messages import (
    EncryptedShare,
    ForwardedShares,
    KeyAdvertisement,
    MaskedInput,
    NeighbourKeys,
    RevealedShare,
    ShareKeysReply,
    UnmaskReply,
    UnmaskRequest,
)


class SecAggStage(enum.StrEnum):
    """The SecAgg+ stages in order; the hub's round coordinator steps through the same ones."""

    ADVERTISING = "advertising"
    SHARING = "sharing"
    MASKING = "masking"
    UNMASKING = "unmasking"
    DONE = "done"


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked sum of the contributors' encoded inputs (decode with n = len(contributors))."""

    round_id: str
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]  # selected but not in the sum, whatever the stage they left at
    total: UIntArray


class SecAggServer:
    """One round at the server; `roster` maps client ids to Ed25519 identity public keys."""

    def __init__(
        self,
        *,
        config: SecAggConfig,
        roster: Mapping[str, bytes],
        seen_public_keys: AbstractSet[bytes] = frozenset(),
    ) -> None:
        self.config = config
        self._roster = roster
        self._seen = seen_public_keys
        self._stage = SecAggStage.ADVERTISING
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._shares: dict[str, tuple[EncryptedShare, ...]] = {}
        self._total = np.zeros(config.vector_length, dtype=f"<u{config.word_bytes}")
        self._masked: set[str] = set()
        self._u1: frozenset[str] = frozenset()
        self._u2: frozenset[str] = frozenset()
        self._u3: frozenset[str] = frozenset()
        self._requests: dict[str, UnmaskRequest] = {}
        self._b: dict[str, dict[int, bytes]] = {}
        self._s: dict[str, dict[int, bytes]] = {}
        self._answered: set[str] = set()

    @property
    def used_public_keys(self) -> frozenset[bytes]:
        """Every public key advertised this round: add them to the ledger of seen keys."""
        return frozenset(k for a in self._adverts.values() for k in (a.c_public, a.s_public))

    def _expect(self, stage: SecAggStage, round_id: str, step: str) -> None:
        if self._stage is not stage:
            raise SecAggProtocolError(f"{step} refused: the round is {self._stage.value}")
        if round_id != self.config.round_id:
            raise SecAggProtocolError(
                f"{step} is for round {round_id!r}, not {self.config.round_id!r}"
            )

    # Round 0 ------------------------------------------------------------------------------
    def receive_advertisement(self, advert: KeyAdvertisement) -> None:
        self._expect(SecAggStage.ADVERTISING, advert.round_id, "key advertisement")
        if advert.client_id not in self.config.clients or advert.client_id in self._adverts:
            raise SecAggProtocolError(f"unexpected or repeated advert from {advert.client_id!r}")
        crypto.verify_advert(
            advert, round_id=self.config.round_id, roster=self._roster, seen_public_keys=self._seen
        )
        if {advert.c_public, advert.s_public} & self.used_public_keys:
            raise SecAggProtocolError(f"{advert.client_id!r} advertises a key already in use")
        self._adverts[advert.client_id] = advert

    def close_advertising(self) -> tuple[str, ...]:
        """U1: the clients to send `neighbour_keys` to."""
        self._expect(SecAggStage.ADVERTISING, self.config.round_id, "close_advertising")
        self._u1 = frozenset(self._adverts)
        self._need(len(self._u1), "clients advertised keys")
        self._stage = SecAggStage.SHARING
        return tuple(sorted(self._u1))

    def neighbour_keys(self, client_id: str) -> NeighbourKeys:
        self._expect(SecAggStage.SHARING, self.config.round_id, "neighbour_keys")
        self._member(client_id, self._u1)
        adverts = tuple(self._adverts[v] for v in sorted(self.config.graph[client_id] & self._u1))
        return NeighbourKeys(self.config.round_id, client_id, adverts)

    # Round 1 ------------------------------------------------------------------------------
    def receive_shares(self, reply: ShareKeysReply) -> None:
        self._expect(SecAggStage.SHARING, reply.round_id, "key shares")
        sender = reply.client_id
        if sender not in self._u1 or sender in self._shares:
            raise SecAggProtocolError(f"unexpected or repeated key shares from {sender!r}")
        receivers = [s.receiver for s in reply.shares]
        expected = self.config.graph[sender] & self._u1
        if sorted(receivers) != sorted(expected):
            raise SecAggProtocolError(
                f"{sender!r} must send one share to each of its {len(expected)} neighbours with "
                f"keys; got {len(receivers)}"
            )
        if any(s.round_id != reply.round_id or s.sender != sender for s in reply.shares):
            raise SecAggProtocolError(f"{sender!r} sent a share labelled with another sender/round")
        self._shares[sender] = reply.shares

    def close_sharing(self) -> tuple[str, ...]:
        """U2: the clients to send `forwarded_shares` to (and to collect masked inputs from)."""
        self._expect(SecAggStage.SHARING, self.config.round_id, "close_sharing")
        self._u2 = frozenset(self._shares)
        self._need(len(self._u2), "clients shared keys")
        for u in sorted(self._u2):
            self._need(
                len(set(self.config.holders(u)) & self._u2), f"holders of {u!r}'s shares remain"
            )
        self._stage = SecAggStage.MASKING
        return tuple(sorted(self._u2))

    def forwarded_shares(self, client_id: str) -> ForwardedShares:
        self._expect(SecAggStage.MASKING, self.config.round_id, "forwarded_shares")
        self._member(client_id, self._u2)
        shares = tuple(
            s for u in sorted(self._u2) for s in self._shares[u] if s.receiver == client_id
        )
        return ForwardedShares(self.config.round_id, client_id, shares)

    # Round 2 ------------------------------------------------------------------------------
    def receive_masked_input(self, masked: MaskedInput) -> None:
        self._expect(SecAggStage.MASKING, masked.round_id, "masked input")
        if masked.client_id not in self._u2 or masked.client_id in self._masked:
            raise SecAggProtocolError(
                f"unexpected or repeated masked input from {masked.client_id!r}"
            )
        size = self.config.vector_length * self.config.word_bytes
        if len(masked.data) != size:
            raise SecAggProtocolError(
                f"masked input from {masked.client_id!r} has {len(masked.data)} bytes; this "
                f"round takes {self.config.vector_length} words of {self.config.bits} bits "
                f"= {size} bytes"
            )
        np.add(self._total, np.frombuffer(masked.data, dtype=self._total.dtype), out=self._total)
        self._masked.add(masked.client_id)

    def close_masking(self) -> tuple[str, ...]:
        """U3: the survivors, whose inputs make the sum; each gets an `unmask_request`."""
        self._expect(SecAggStage.MASKING, self.config.round_id, "close_masking")
        self._u3 = frozenset(self._masked)
        self._need(len(self._u3), "clients sent masked inputs")
        for u in sorted(self._u2):
            self._need(
                len(set(self.config.holders(u)) & self._u3), f"holders of {u!r}'s shares survive"
            )
        self._stage = SecAggStage.UNMASKING
        return tuple(sorted(self._u3))

    def unmask_request(self, client_id: str) -> UnmaskRequest:
        self._expect(SecAggStage.UNMASKING, self.config.round_id, "unmask_request")
        self._member(client_id, self._u3)
        peers = (self.config.graph[client_id] & self._u2) | {client_id}
        request = UnmaskRequest(
            self.config.round_id,
            client_id,
            tuple(sorted(peers & self._u3)),
            tuple(sorted(peers - self._u3)),
        )
        self._requests[client_id] = request
        return request

    # Round 3 ------------------------------------------------------------------------------
    def receive_unmask(self, reply: UnmaskReply) -> None:
        self._expect(SecAggStage.UNMASKING, reply.round_id, "unmask reply")
        holder, request = reply.client_id, self._requests.get(reply.client_id)
        if request is None or holder in self._answered:
            raise SecAggProtocolError(f"unexpected or repeated unmask reply from {holder!r}")
        self._check_revealed(holder, reply.b_shares, request.survivors, "b-share")
        self._check_revealed(holder, reply.s_shares, request.dropped, "s-key share")
        for share in reply.b_shares:
            self._b.setdefault(share.owner, {})[share.index] = share.data
        for share in reply.s_shares:
            self._s.setdefault(share.owner, {})[share.index] = share.data
        self._answered.add(holder)

    def _check_revealed(
        self,
        holder: str,
        shares: tuple[RevealedShare, ...],
        owners: tuple[str, ...],
        what: str,
    ) -> None:
        if sorted(s.owner for s in shares) != sorted(owners):
            raise SecAggProtocolError(f"{holder!r} revealed {what}s for other clients than asked")
        for share in shares:
            x = self.config.holders(share.owner).index(holder) + 1
            if share.index != x or not crypto.is_share(share.data):
                raise SecAggProtocolError(
                    f"{holder!r} revealed a malformed {what} of {share.owner!r}"
                )

    def finish(self) -> SecAggResult:
        """Reconstruct b_u of survivors and s_u of the dropped, remove every mask, return Σ x_u."""
        self._expect(SecAggStage.UNMASKING, self.config.round_id, "finish")
        cfg, total = self.config, self._total.copy()
        stream = crypto.MaskStream(cfg.vector_length, cfg.bits)
        for u in sorted(self._u3):
            seed = crypto.combine_secret(
                list(self._b.get(u, {}).items()),
                cfg.threshold,
                f"mask seed of {u!r}",
                size=crypto.SEED_BYTES,
            )
            stream.add(total, seed, -1)
        dropped = self._u2 - self._u3
        for u in sorted(dropped):
            s_key = self._recover_s_key(u)
            for v in sorted(cfg.graph[u] & self._u3):
                key = crypto.mask_key(s_key, self._adverts[v].s_public, cfg.round_id, u, v)
                stream.add(total, key, -crypto.mask_sign(v, u))
        self._stage = SecAggStage.DONE
        absent = tuple(sorted(set(cfg.clients) - self._u3))
        return SecAggResult(cfg.round_id, tuple(sorted(self._u3)), absent, total)

    def _recover_s_key(self, u: str) -> X25519PrivateKey:
        raw = crypto.combine_secret(
            list(self._s.get(u, {}).items()),
            self.config.threshold,
            f"s key of {u!r}",
            size=crypto.KEY_BYTES,
        )
        key = X25519PrivateKey.from_private_bytes(raw)
        if crypto.public_bytes(key) != self._adverts[u].s_public:
            raise SecAggRoundFailedError(
                f"the shares of {u!r}'s s key do not rebuild the key it advertised; a holder "
                "revealed a corrupt share"
            )
        return key

    def _need(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise SecAggRoundFailedError(
                f"round {self.config.round_id!r} failed: only {count} {what}, threshold t = "
                f"{self.config.threshold}; the sum cannot be recovered"
            )

    def _member(self, client_id: str, members: frozenset[str]) -> None:
        if client_id not in members:
            raise SecAggProtocolError(f"{client_id!r} is not taking part in this stage")
