"""A client's side of one SecAgg+ round: a state machine without I/O (the node carries messages).

    client = SecAggClient(config=cfg, client_id="h1", identity=identity, roster=roster)
    advert = client.advertise()                       # → server
    reply = client.share_keys(neighbour_keys)         # ← server, → server
    masked = client.mask(forwarded_shares, encoded)   # ← server, → server
    shares = client.unmask(unmask_request)            # ← server, → server

Each method may run once, in this order; any other order is refused. Keys are fresh per round
and leave the object only as Shamir shares under AES-GCM, or as `state()` for the node to keep
sealed on its own disk (`aipipe.node.round_state`) so that a restarted node resumes the round
with `SecAggClient.restore` instead of counting as dropped.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aipipe.secure.errors import SecAggProtocolError, SecAggRoundFailedError, UnmaskRefusedError
from aipipe.secure.identity import Identity
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


@dataclass(frozen=True)
class ClientState:
    """Everything a client holds between stages, secrets included: to be kept sealed."""

    stage: str
    c_key: bytes
    s_key: bytes
    adverts: tuple[KeyAdvertisement, ...] = ()
    seed: bytes = b""
    own_b_share: tuple[int, bytes] = (0, b"")
    b_shares: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    s_shares: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    peers: tuple[str, ...] = ()
    share_keys: dict[str, bytes] = field(default_factory=dict)


class _Stage(enum.Enum):
    NEW = "new"
    ADVERTISED = "advertised"
    SHARED = "shared"
    MASKED = "masked"
    DONE = "done"


class SecAggClient:
    """One client in one round; `roster` maps client ids to Ed25519 identity public keys."""

    def __init__(
        self,
        *,
        config: SecAggConfig,
        client_id: str,
        identity: Identity,
        roster: Mapping[str, bytes],
        seen_public_keys: AbstractSet[bytes] = frozenset(),
    ) -> None:
        if client_id not in config.clients:
            raise SecAggProtocolError(f"client {client_id!r} is not in round {config.round_id!r}")
        self.config = config
        self.client_id = client_id
        self._identity = identity
        self._roster = roster
        self._seen = seen_public_keys
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._stage = _Stage.NEW
        self._adverts: dict[str, KeyAdvertisement] = {}
        self._seed = b""
        self._own_b_share: tuple[int, bytes] = (0, b"")
        self._b_shares: dict[str, tuple[int, bytes]] = {}
        self._s_shares: dict[str, tuple[int, bytes]] = {}
        self._peers: frozenset[str] = frozenset()
        self._share_keys: dict[str, bytes] = {}

    def state(self) -> ClientState:
        """The client's whole state (its private keys too), for `restore` after a restart."""
        return ClientState(
            stage=self._stage.value,
            c_key=crypto.private_bytes(self._c_key),
            s_key=crypto.private_bytes(self._s_key),
            adverts=tuple(self._adverts.values()),
            seed=self._seed,
            own_b_share=self._own_b_share,
            b_shares=dict(self._b_shares),
            s_shares=dict(self._s_shares),
            peers=tuple(sorted(self._peers)),
            share_keys=dict(self._share_keys),
        )

    @classmethod
    def restore(
        cls,
        state: ClientState,
        *,
        config: SecAggConfig,
        client_id: str,
        identity: Identity,
        roster: Mapping[str, bytes],
    ) -> SecAggClient:
        """The client that `state()` saved, at the stage it had reached."""
        client = cls(config=config, client_id=client_id, identity=identity, roster=roster)
        client._c_key = X25519PrivateKey.from_private_bytes(state.c_key)
        client._s_key = X25519PrivateKey.from_private_bytes(state.s_key)
        client._stage = _Stage(state.stage)
        client._adverts = {a.client_id: a for a in state.adverts}
        client._seed = state.seed
        client._own_b_share = state.own_b_share
        client._b_shares = dict(state.b_shares)
        client._s_shares = dict(state.s_shares)
        client._peers = frozenset(state.peers)
        client._share_keys = dict(state.share_keys)
        return client

    def _expect(self, stage: _Stage, round_id: str, recipient: str, step: str) -> None:
        if self._stage is not stage:
            raise SecAggProtocolError(f"{step} is out of order: client is {self._stage.value}")
        if round_id != self.config.round_id:
            raise SecAggProtocolError(f"{step} is for round {round_id!r}, not this round")
        if recipient != self.client_id:
            raise SecAggProtocolError(f"{step} is addressed to {recipient!r}")

    def advertise(self) -> KeyAdvertisement:
        """Round 0: both fresh public keys, signed with the identity key."""
        self._expect(_Stage.NEW, self.config.round_id, self.client_id, "advertise")
        c_pub, s_pub = crypto.public_bytes(self._c_key), crypto.public_bytes(self._s_key)
        payload = crypto.advert_payload(self.config.round_id, self.client_id, c_pub, s_pub)
        self._stage = _Stage.ADVERTISED
        return KeyAdvertisement(
            self.config.round_id, self.client_id, c_pub, s_pub, self._identity.sign(payload)
        )

    def share_keys(self, keys: NeighbourKeys) -> ShareKeysReply:
        """Round 1: check the neighbours' adverts, share b_u and the s key among the holders."""
        cfg, me = self.config, self.client_id
        self._expect(_Stage.ADVERTISED, keys.round_id, keys.recipient, "share_keys")
        self._accept_adverts(keys)
        _need_holders(len(self._adverts) + 1, cfg.threshold, "neighbours advertised keys")
        # c_uv is the same key from either end (labels sorted), so one X25519 agreement per
        # neighbour seals the shares sent to it here and opens those it sends back in `mask`.
        self._share_keys = {
            v: crypto.share_key(self._c_key, a.c_public, cfg.round_id, me, v)
            for v, a in self._adverts.items()
        }
        holders = cfg.holders(me)
        self._seed = os.urandom(crypto.SEED_BYTES)
        b_shares = crypto.split_secret(self._seed, cfg.threshold, len(holders))
        s_shares = crypto.split_secret(
            crypto.private_bytes(self._s_key), cfg.threshold, len(holders)
        )
        out = []
        for position, holder in enumerate(holders):
            if holder == me:
                self._own_b_share = (position + 1, b_shares[position])
            elif holder in self._share_keys:
                ad = crypto.share_ad(cfg.round_id, me, holder)
                sealed = crypto.seal_share(
                    self._share_keys[holder],
                    ad,
                    position + 1,
                    b_shares[position],
                    s_shares[position],
                )
                out.append(EncryptedShare(cfg.round_id, me, holder, sealed))
        self._stage = _Stage.SHARED
        return ShareKeysReply(cfg.round_id, me, tuple(out))

    def _accept_adverts(self, keys: NeighbourKeys) -> None:
        cfg, me = self.config, self.client_id
        used = {crypto.public_bytes(self._c_key), crypto.public_bytes(self._s_key)}
        for advert in keys.adverts:
            crypto.verify_advert(
                advert, round_id=cfg.round_id, roster=self._roster, seen_public_keys=self._seen
            )
            if advert.client_id not in cfg.graph[me] or advert.client_id in self._adverts:
                raise SecAggProtocolError(f"unexpected key advert from {advert.client_id!r}")
            if {advert.c_public, advert.s_public} & used:
                raise SecAggProtocolError(f"{advert.client_id!r} advertises a key already in use")
            used |= {advert.c_public, advert.s_public}
            self._adverts[advert.client_id] = advert

    def mask(self, forwarded: ForwardedShares, encoded: UIntArray) -> MaskedInput:
        """Round 2: keep the shares addressed here; send y = x + PRG(b) + Σ ±PRG(s_uv)."""
        cfg, me = self.config, self.client_id
        self._expect(_Stage.SHARED, forwarded.round_id, forwarded.recipient, "mask")
        words = np.asarray(encoded)
        dtype = np.dtype(f"uint{cfg.bits}")
        if words.shape != (cfg.vector_length,) or words.dtype != dtype:
            raise SecAggProtocolError(
                f"input of shape {words.shape} and dtype {words.dtype}; round {cfg.round_id!r} "
                f"takes ({cfg.vector_length},) {dtype} (encode it with the study's codec)"
            )
        for share in forwarded.shares:
            self._keep_share(share)
        self._peers = frozenset(self._b_shares)
        _need_holders(len(self._peers) + 1, cfg.threshold, "neighbours shared keys")
        stream = crypto.MaskStream(cfg.vector_length, cfg.bits)
        masked = stream.masked(words, self._seed)
        for peer in sorted(self._peers):
            key = crypto.mask_key(self._s_key, self._adverts[peer].s_public, cfg.round_id, me, peer)
            stream.add(masked, key, crypto.mask_sign(me, peer))
        self._stage = _Stage.MASKED
        return MaskedInput(cfg.round_id, me, masked.tobytes())

    def _keep_share(self, share: EncryptedShare) -> None:
        cfg, sender = self.config, share.sender
        if share.round_id != cfg.round_id or share.receiver != self.client_id:
            raise SecAggProtocolError(f"a share from {sender!r} is bound to another round or peer")
        if sender not in self._adverts or sender in self._b_shares:
            raise SecAggProtocolError(f"unexpected or repeated share from {sender!r}")
        ad = crypto.share_ad(cfg.round_id, sender, self.client_id)
        index, b_share, s_share = crypto.open_share(self._share_keys[sender], ad, share.ciphertext)
        if index != cfg.holders(sender).index(self.client_id) + 1:
            raise SecAggProtocolError(f"share from {sender!r} carries x = {index}, not ours")
        self._b_shares[sender] = (index, b_share)
        self._s_shares[sender] = (index, s_share)

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Round 3: b-shares of surviving neighbours, s-key shares of dropped ones, never both."""
        if self._stage is _Stage.DONE:
            raise UnmaskRefusedError(
                f"client {self.client_id!r} already answered an unmask request this round; a "
                "second one could reveal both shares of a neighbour"
            )
        self._expect(_Stage.MASKED, request.round_id, request.recipient, "unmask")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped
        if both:
            raise UnmaskRefusedError(
                f"server asked for both shares of {sorted(both)}; that would unmask their inputs"
            )
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise SecAggProtocolError("unmask request lists a client twice")
        if self.client_id not in survivors or survivors | dropped != self._peers | {self.client_id}:
            raise SecAggProtocolError(
                "unmask request does not match the neighbours this client masked with"
            )
        _need_holders(len(survivors), self.config.threshold, "neighbours survived")
        b_shares = {**self._b_shares, self.client_id: self._own_b_share}
        reply = UnmaskReply(
            self.config.round_id,
            self.client_id,
            tuple(RevealedShare(o, *b_shares[o]) for o in sorted(survivors)),
            tuple(RevealedShare(o, *self._s_shares[o]) for o in sorted(dropped)),
        )
        self._stage = _Stage.DONE
        self._seed, self._b_shares, self._s_shares, self._share_keys = b"", {}, {}, {}
        return reply


def _need_holders(count: int, threshold: int, what: str) -> None:
    if count < threshold:
        raise SecAggRoundFailedError(
            f"only {count} of the needed {threshold} (threshold t, this client included) {what}"
        )
