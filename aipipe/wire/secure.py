"""Wire messages of secure aggregation (DESIGN §7): SecAgg+ stages and the CKKS key ceremony.

The SecAgg+ payloads are the protocol's own frozen dataclasses (`aipipe.wire.secagg_messages`)
carried inside pydantic envelopes, so both ends validate exactly the fields the state machines
use; byte fields travel as base64 in JSON (keys and shares are tens of bytes). Masked inputs and
ciphertexts are large and travel as binary frames behind a signed `UpdateHeader` instead.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, WithJsonSchema

from aipipe.wire.canonical import frame
from aipipe.wire.messages import _HEX64, _NAME, PROTOCOL_VERSION, UpdateHeader, Wire
from aipipe.wire.secagg_messages import (
    ForwardedShares,
    KeyAdvertisement,
    NeighbourKeys,
    ShareKeysReply,
    UnmaskReply,
    UnmaskRequest,
)

SEALING_KEY_LABEL = b"aipipe/sealing-key/v1"
CKKS_KEYS_LABEL = b"aipipe/ckks/public-context/v1"
DECRYPTED_LABEL = b"aipipe/ckks/decrypted-sum/v1"

SecAggStep = Literal[
    "advert", "neighbour-keys", "shares", "forwarded-shares", "unmask-request", "unmask"
]


def sealing_key_payload(node: str, sealing_key: bytes) -> bytes:
    """What a node's identity key signs to vouch for its X25519 sealing key."""
    return frame(SEALING_KEY_LABEL, node, sealing_key)


def ckks_keys_payload(study: str, fingerprint: bytes, public_context: bytes) -> bytes:
    """What the generating node signs: the study's public context and its fingerprint."""
    return frame(CKKS_KEYS_LABEL, study, fingerprint, public_context)


def _base64_schema(min_bytes: int, max_bytes: int) -> dict[str, Any]:
    """A byte field's JSON schema as it travels: base64 text, 4 characters per 3 bytes."""
    return {
        "type": "string",
        "contentEncoding": "base64",
        "minLength": 4 * -(-min_bytes // 3),
        "maxLength": 4 * -(-max_bytes // 3),
    }


Bytes32 = Annotated[
    bytes, Field(min_length=32, max_length=32), WithJsonSchema(_base64_schema(32, 32))
]
Bytes64 = Annotated[
    bytes, Field(min_length=64, max_length=64), WithJsonSchema(_base64_schema(64, 64))
]
PublicContext = Annotated[bytes, Field(max_length=4096), WithJsonSchema(_base64_schema(0, 4096))]


class BytesWire(Wire):
    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )


class KeyringEntry(BytesWire):
    """A node's public keys as the hub enrolled them; the sealing key is signed by the identity."""

    node: str = Field(pattern=_NAME)
    identity_key: Bytes32
    sealing_key: Bytes32 | None = None
    sealing_signature: Bytes64 | None = None


class Keyring(BytesWire):
    nodes: list[KeyringEntry]


class SecAggRoundConfig(Wire):
    """What the hub announces for a SecAgg+ round; each node checks it against its study."""

    protocol: int = PROTOCOL_VERSION
    round_id: str
    clients: list[str]
    vector_length: int = Field(gt=1)
    neighbours: int = Field(gt=0)
    threshold: int = Field(gt=1)
    bits: Literal[32, 64]


class SecAggAdvert(BytesWire):
    advert: KeyAdvertisement


class SecAggNeighbourKeys(BytesWire):
    keys: NeighbourKeys


class SecAggShares(BytesWire):
    reply: ShareKeysReply


class SecAggForwarded(BytesWire):
    shares: ForwardedShares


class SecAggUnmaskRequest(BytesWire):
    request: UnmaskRequest


class SecAggUnmask(BytesWire):
    reply: UnmaskReply


class SealedContextWire(BytesWire):
    """`aipipe.secure.ckks.SealedContext`: a secret context sealed to one node, signed."""

    study_id: str
    recipient_id: str = Field(pattern=_NAME)
    fingerprint: Bytes32
    sealed: bytes
    signature: Bytes64


class CkksKeys(BytesWire):
    """The key ceremony's output: the public context (hub) and one sealed secret per node."""

    protocol: int = PROTOCOL_VERSION
    generator: str = Field(pattern=_NAME)
    fingerprint: Bytes32
    public_context: PublicContext
    signature: Bytes64
    sealed: list[SealedContextWire]


class CkksKeyInfo(BytesWire):
    """What a node fetches: the public context, who made it, and the box sealed to this node."""

    generator: str
    fingerprint: bytes
    public_context: bytes
    signature: bytes
    sealed: SealedContextWire | None


class DecryptBundleHeader(Wire):
    """Frame header of what a key holder gets to decrypt: the signed contributions, in the
    order their ciphertexts follow the sum in the payload, and every part's length."""

    protocol: int = PROTOCOL_VERSION
    contributions: list[UpdateHeader]
    sizes: list[int]


class DecryptedSum(Wire):
    """Frame header of a key holder's answer; the payload is the float64 sum (safetensors)."""

    protocol: int = PROTOCOL_VERSION
    node: str = Field(pattern=_NAME)
    study: str
    round: int = Field(ge=1)
    sum_sha256: str = Field(pattern=_HEX64)
    contributors: list[str]
    payload_sha256: str = Field(pattern=_HEX64)
    signature: str = ""

    def signing_bytes(self) -> bytes:
        fields = self.model_dump_json(exclude={"signature"}).encode()
        return frame(DECRYPTED_LABEL, fields)
