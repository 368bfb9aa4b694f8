"""Every message between node and hub, as frozen pydantic models with `extra="forbid"`.

Updates are bound to (study, round, base model version) and signed with the node's Ed25519
key over `UpdateHeader.signing_bytes()`, so a replayed, cross-round, wrong-version or unsigned
update is refused by the hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

PROTOCOL_VERSION = 1
TOKEN_PREFIX = "aipipe-enrol."

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_STUDY = r"^[a-z0-9][a-z0-9-]{0,62}$"
_HEX64 = r"^[0-9a-f]{64}$"
# Counts of examples: far above any site's cohort, and below SQLite's 64-bit INTEGER, so an
# absurd count is a validation error (refused and audited), never an overflow.
MAX_COUNT = 2**31 - 1


class SecureMode(StrEnum):
    """How a study's updates travel: in the clear, as SecAgg+ masked vectors, or CKKS
    ciphertexts (a study's `secure:`; a round protocol is registered under each)."""

    NONE = "none"
    SECAGG = "secagg"
    CKKS = "ckks"


class RoundState(StrEnum):
    """A round's state at the hub (`open` and `collecting` take updates)."""

    OPEN = "open"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in (RoundState.OPEN, RoundState.COLLECTING)

    @property
    def ended(self) -> bool:
        return self in (RoundState.CLOSED, RoundState.FAILED)


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(Wire):
    """What the hub answers with every error status: the error's class and one line."""

    detail: str
    error: str | None = None  # the `AipipeError` class name (aipipe.errors.error_body)


class EnrolToken(Wire):
    """What `aipipe hub enrol-token` prints, as `aipipe-enrol.<base64url JSON>`.

    `ca_cert` (base64 DER) is the consortium CA the node will trust, alone, for every call to
    the hub; `ca_sha256` its fingerprint, checked here. Tokens from a hub without a CA (before
    issue 15) have neither and still decode."""

    hub_url: str
    node: str = Field(pattern=_NAME)
    secret: str = Field(min_length=32)
    ca_sha256: str | None = Field(default=None, pattern=_HEX64)
    ca_cert: str | None = Field(default=None, max_length=8192)

    @model_validator(mode="after")
    def _pinned(self) -> EnrolToken:
        if (self.ca_sha256 is None) != (self.ca_cert is None):
            raise ValueError("ca_sha256 and ca_cert come together")
        digest = hashlib.sha256(self.ca_der()).hexdigest()
        if self.ca_sha256 is not None and digest != self.ca_sha256:
            raise ValueError("ca_cert does not hash to ca_sha256")
        return self

    def ca_der(self) -> bytes:
        """The pinned CA certificate's DER bytes (empty without a pin)."""
        return base64.b64decode(self.ca_cert or "", validate=True)

    def encode(self) -> str:
        raw = base64.urlsafe_b64encode(self.model_dump_json().encode()).decode().rstrip("=")
        return TOKEN_PREFIX + raw

    @classmethod
    def decode(cls, token: str) -> EnrolToken:
        if not token.startswith(TOKEN_PREFIX):
            raise ValueError("an enrolment token starts with 'aipipe-enrol.'")
        body = token[len(TOKEN_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return cls.model_validate_json(raw)
        except (ValueError, ValidationError) as exc:
            raise ValueError("the enrolment token is damaged; ask the hub for a new one") from exc


class EnrolRequest(Wire):
    protocol: int = PROTOCOL_VERSION
    node: str = Field(pattern=_NAME)
    secret: str
    public_key: str = Field(pattern=_HEX64)
    # X25519 key that secrets (a study's CKKS context) are sealed to, signed by the identity
    # key over `aipipe.wire.secure.sealing_key_payload`.
    sealing_key: str | None = Field(default=None, pattern=_HEX64)
    sealing_signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")
    # PEM CSR for the node's TLS client key (CN = node); older nodes send none and get none.
    client_csr: str | None = Field(default=None, max_length=4096)


class ClientCertRequest(Wire):
    """A node asking for a new client certificate (renewal): the PEM CSR of its new key."""

    csr: str = Field(max_length=4096)


class ClientCert(Wire):
    """A node's TLS client certificate (PEM), signed by the consortium CA, and its expiry."""

    cert: str
    not_after: str


class EnrolResponse(Wire):
    node: str
    credential: str
    hub_public_key: str
    client_cert: ClientCert | None = None  # for the request's client_csr (aipipe.hub.mtls)


class NodeInfo(Wire):
    name: str
    public_key: str
    state: str
    enrolled_at: str
    last_seen: str | None


class StudyPublish(Wire):
    protocol: int = PROTOCOL_VERSION
    spec: dict[str, Any]


class StudyInfo(Wire):
    name: str
    digest: str
    spec: dict[str, Any]
    published_at: str
    current_version: str | None
    rounds_closed: int


class RoundOpen(Wire):
    deadline_s: float | None = Field(default=None, gt=0)


class RoundInfo(Wire):
    study: str
    round: int
    state: RoundState
    base_version: str
    selected: list[str]
    reported: list[str]
    declined: dict[str, str]
    deadline: str
    reason: str | None = None
    # Secure rounds: "keys", "advertising", "sharing", "masking", "unmasking", "decrypting".
    stage: str | None = None
    result_version: str | None = None
    metrics: dict[str, dict[str, Any]] = Field(default_factory=dict)


class IdleWork(Wire):
    """Nothing to do now."""

    kind: Literal["idle"] = "idle"


class EvaluateWork(Wire):
    """Evaluate a round's result `version` on the node's test split."""

    kind: Literal["evaluate"] = "evaluate"
    study: str
    study_digest: str
    round: int
    version: str


class RoundWork(Wire):
    """A step of an open round, trained or computed on its base model `version`: `train` (every
    secure mode), and the CKKS key holder's `keygen` and `decrypt`."""

    kind: Literal["train", "keygen", "decrypt"]
    study: str
    study_digest: str
    round: int
    version: str
    deadline: str | None = None


WorkItem = Annotated[IdleWork | EvaluateWork | RoundWork, Field(discriminator="kind")]
"""What the hub asks of a node, told apart by `kind`."""

WORK_ITEM: TypeAdapter[WorkItem] = TypeAdapter(WorkItem)
"""Parses a `WorkItem` (a union has no `model_validate` of its own)."""


class UpdateHeader(Wire):
    """The signed part of an update. `payload_sha256` binds the tensors.

    Under secure aggregation the payload is a masked vector (`secagg`) or a ciphertext (`ckks`)
    and the header leaves out the node's n and update norm: the hub learns only their sums.
    """

    protocol: int = PROTOCOL_VERSION
    node: str = Field(pattern=_NAME)
    study: str = Field(pattern=_STUDY)
    study_digest: str = Field(pattern=_HEX64)
    round: int = Field(ge=1)
    base_version: str = Field(pattern=_HEX64)
    secure: SecureMode = SecureMode.NONE
    num_examples: int | None = Field(default=None, gt=0, le=MAX_COUNT)
    payload_sha256: str = Field(pattern=_HEX64)
    epsilon_spent: float | None = None
    delta: float | None = None
    train_loss: float | None = None
    update_norm: float | None = Field(default=None, ge=0)
    nonce: str = Field(min_length=16, max_length=64)
    signature: str = ""

    @model_validator(mode="after")
    def _plain_updates_say_n_and_norm(self) -> UpdateHeader:
        plain = SecureMode(self.secure) is SecureMode.NONE
        if plain != (self.num_examples is not None and self.update_norm is not None):
            raise ValueError(
                "a plaintext update states num_examples and update_norm; a secure one neither"
            )
        return self

    def signing_bytes(self) -> bytes:
        fields = self.model_dump(exclude={"signature"})
        return (
            b"aipipe-update:" + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        )


class UpdateReceipt(Wire):
    accepted: bool
    round_state: str
    reason: str | None = None


class Decline(Wire):
    """A node that will not train this round; `exclude` drops it from the study's later rounds
    (its privacy budget is spent)."""

    reason: str = Field(max_length=500)
    exclude: bool = False


class CalibrationHistogram(Wire):
    """A site's DP release for the study's validation gate: per predicted-probability bin, the
    noised count of negatives and of positives on its test split (Gaussian noise, σ = z·1: one
    patient is in one cell), charged to the site ledger (kind "validation") before it leaves."""

    study_digest: str = Field(pattern=_HEX64)
    negatives: list[float] = Field(min_length=2, max_length=50)
    positives: list[float] = Field(min_length=2, max_length=50)
    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _same_bins(self) -> CalibrationHistogram:
        if len(self.negatives) != len(self.positives):
            raise ValueError("negatives and positives need one count per bin each")
        if not all(math.isfinite(v) for v in [*self.negatives, *self.positives]):
            raise ValueError("histogram counts must be finite")
        return self


class EvalReport(Wire):
    """A node's word that it has dealt with a version (so the hub stops offering it).

    Nodes send it without exact numbers: n_test, accuracy, AUC or loss leak labels (a crafted
    model reveals the count of positives). The only numbers are `calibration`, the study's DP
    validation histogram, when it asks for one. The other fields stay for older nodes."""

    protocol: int = PROTOCOL_VERSION
    version: str = Field(pattern=_HEX64)
    n: int | None = Field(default=None, ge=0, le=MAX_COUNT)
    accuracy: float | None = None
    auc: float | None = None
    loss: float | None = None
    local_accuracy: float | None = None
    local_auc: float | None = None
    # The study's validation release (`validation.epsilon > 0`), noised and charged.
    calibration: CalibrationHistogram | None = None


class FeatureStats(Wire):
    """A site's train-split statistics under DP: what the hub pools to score patients for CDS.

    The Gaussian mechanism's output (aipipe.privacy.statistics): a noised row count and, per
    matrix column clipped to the study's range, noised Σx and Σx², in the column's unit. The
    count is a float and may be small, negative or a little above max_examples; the hub
    derives pooled means and stds from the sums (post-processing). No row and no exact
    count leaves the node; the release is charged to the site's privacy ledger.
    """

    protocol: int = PROTOCOL_VERSION
    study_digest: str = Field(pattern=_HEX64)
    n: float
    sums: list[float]
    squares: list[float]


class ModelVersionInfo(Wire):
    version: str
    study: str
    round: int
    parent: str | None
    created_at: str
    aggregator: str
    contributors: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    # Updates a study's `detection` flagged and left out of this version, with their scores.
    excluded: list[dict[str, Any]] = Field(default_factory=list)
    # The pooled validation of the sites' DP histograms (`aipipe.hub.validation`), if any.
    validation: dict[str, Any] | None = None
    # The study's personalization method and which tensors are federated (`aipipe.hub.personal`).
    personalization: dict[str, Any] | None = None
