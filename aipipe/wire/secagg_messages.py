"""SecAgg+ messages between clients (nodes) and the server (hub): frozen dataclasses of str, int
and bytes, so the wire layer can carry them as they are (no pickles, no class names in payloads).
They live in `aipipe.wire` (which imports nothing above it); the state machines in
`aipipe.secure.secagg` build and read them.

Stages follow Bonawitz et al. 2017, Fig. 4 (rounds 0–4 minus the consistency check), with the
neighbour graph of Bell et al. 2020 ("SecAgg+"):

    0 AdvertiseKeys   client → server  KeyAdvertisement     (signed c/s public keys)
                      server → client  NeighbourKeys        (the adverts of its neighbours)
    1 ShareKeys       client → server  ShareKeysReply       (one EncryptedShare per neighbour)
                      server → client  ForwardedShares      (the shares addressed to it)
    2 MaskedInput     client → server  MaskedInput          (y_u as little-endian words)
    3 Unmasking       server → client  UnmaskRequest        (which neighbours survived/dropped)
                      client → server  UnmaskReply          (b-shares of survivors,
                                                             s-key shares of the dropped)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeyAdvertisement:
    """A client's two fresh X25519 public keys for one round, signed by its Ed25519 identity.

    `c_public` encrypts the shares sent to this client; `s_public` seeds its pairwise masks.
    """

    round_id: str
    client_id: str
    c_public: bytes
    s_public: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class NeighbourKeys:
    round_id: str
    recipient: str
    adverts: tuple[KeyAdvertisement, ...]


@dataclass(frozen=True, slots=True)
class EncryptedShare:
    """AES-GCM(nonce ‖ ciphertext) of (share index, b-share, s-key share) from sender to receiver.

    The associated data binds (round, sender, receiver): the server can route but not read or
    re-address a share, and a share from another round fails to decrypt.
    """

    round_id: str
    sender: str
    receiver: str
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class ShareKeysReply:
    round_id: str
    client_id: str
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, slots=True)
class ForwardedShares:
    round_id: str
    recipient: str
    shares: tuple[EncryptedShare, ...]


@dataclass(frozen=True, slots=True)
class MaskedInput:
    """y_u = x_u + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2^bits, as `bits`-wide little-endian words."""

    round_id: str
    client_id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class UnmaskRequest:
    """For one survivor: which of its neighbours (itself included) survived and which dropped."""

    round_id: str
    recipient: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RevealedShare:
    """A Shamir share of `owner`'s secret: x-coordinate `index`, one F_p element (66 bytes)."""

    owner: str
    index: int
    data: bytes


@dataclass(frozen=True, slots=True)
class UnmaskReply:
    round_id: str
    client_id: str
    b_shares: tuple[RevealedShare, ...]
    s_shares: tuple[RevealedShare, ...]
