"""SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020): the hub learns only the sum of masked inputs.

Client and server are I/O-free state machines exchanging the frozen dataclasses of `messages`;
inputs are words mod 2^bits from `aipipe.secure.fixedpoint.FixedPointCodec`.
"""

from aipipe.secure.secagg.client import SecAggClient
from aipipe.secure.secagg.graph import (
    SecAggConfig,
    default_neighbours,
    default_threshold,
    minimum_threshold,
    neighbour_graph,
)
from aipipe.secure.secagg.server import SecAggResult, SecAggServer, SecAggStage
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
    "SecAggClient",
    "SecAggConfig",
    "SecAggResult",
    "SecAggServer",
    "SecAggStage",
    "ShareKeysReply",
    "UnmaskReply",
    "UnmaskRequest",
    "default_neighbours",
    "default_threshold",
    "minimum_threshold",
    "neighbour_graph",
]
