"""The SecAgg+ messages, kept where the protocol's modules import them from; they are defined in
`aipipe.wire.secagg_messages` so that the wire layer imports nothing above it."""

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

__all__ = [
    "EncryptedShare",
    "ForwardedShares",
    "KeyAdvertisement",
    "MaskedInput",
    "NeighbourKeys",
    "RevealedShare",
    "ShareKeysReply",
    "UnmaskReply",
    "UnmaskRequest",
]
