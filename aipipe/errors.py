"""The aipipe exception tree.

Every error a user can cause or fix derives from `AipipeError`; the CLI maps it to one red line
and a non-zero exit code (``aipipe.cli.render.fail``). Foreign exceptions are translated where
they enter (``raise FhirServerError(...) from exc``), never logged and re-raised.

    AipipeError
    ├── ConfigError               bad settings, node home missing or already there
    │   ├── NodeExistsError
    │   └── NodeNotFoundError
    ├── StudyError                study YAML invalid or unusable on this node's data
    ├── SourceError               an input path that cannot be read at all
    ├── FhirServerError           a FHIR server unreachable or answering with errors
    ├── StoreError                the SQLite store is corrupt or of a newer schema
    │   └── BlobIntegrityError    a stored blob is missing or does not hash to its address
    ├── IdentityError             key files missing, unreadable or with loose permissions
    ├── SignatureError            a signature that does not verify
    ├── AuditChainBrokenError     an audit log whose hash chain does not verify
    ├── HubUnavailableError       the hub cannot be reached
    ├── AuthError                 missing, wrong or insufficient credentials
    │   └── ForbiddenError        a valid credential outside its scope (HTTP 403)
    ├── NotFoundError             a study, round, node or model that does not exist
    ├── ConflictError             a request that the current state forbids (round already open)
    ├── UpdateRejectedError       an update the hub refuses (bad signature, replay, late, …)
    ├── StudyNotApprovedError     a node asked to train for a study it has not approved
    ├── AggregationError          (aipipe.aggregation) unusable update, sum or setting
    ├── SecureAggregationError    (aipipe.secure.errors) exit 16: masks, shares, CKKS contexts
    ├── PrivacyError              (aipipe.privacy.errors) exit 17, e.g. BudgetExhaustedError
    └── ModelError                (aipipe.models.errors) exit 18: weights that fit no model
"""

from __future__ import annotations


class AipipeError(Exception):
    """Base class of every error that aipipe reports to a user without a traceback."""

    exit_code = 1


class ConfigError(AipipeError):
    """Settings or a home directory are missing, malformed or in the way."""

    exit_code = 2


class NodeExistsError(ConfigError):
    """`node init` would overwrite an existing node."""


class NodeNotFoundError(ConfigError):
    """A command names a node home that has not been initialised."""


class StudyError(AipipeError):
    """A study definition is invalid, or cannot be applied to this node's data."""

    exit_code = 3


class SourceError(AipipeError):
    """An ingest source cannot be opened at all (per-resource problems are counted instead)."""

    exit_code = 4


class FhirServerError(AipipeError):
    """A FHIR server is unreachable or keeps answering with errors."""

    exit_code = 5


class StoreError(AipipeError):
    """The node's SQLite store cannot be used (corrupt, or written by a newer aipipe)."""

    exit_code = 6


class BlobIntegrityError(StoreError):
    """A content-addressed blob is missing or its bytes do not hash to its address."""


class IdentityError(AipipeError):
    """A key file is missing, unreadable or readable by others."""

    exit_code = 7


class SignatureError(AipipeError):
    """A signature does not verify against the claimed key."""

    exit_code = 8


class AuditChainBrokenError(AipipeError):
    """An audit log was edited, truncated or reordered."""

    exit_code = 9

    def __init__(self, message: str, *, first_bad_seq: int) -> None:
        super().__init__(message)
        self.first_bad_seq = first_bad_seq


class HubUnavailableError(AipipeError):
    """The hub cannot be reached (connection refused, timeouts, 5xx after retries)."""

    exit_code = 10


class AuthError(AipipeError):
    """A request without valid credentials, or with a role that may not do this."""

    exit_code = 11


class ForbiddenError(AuthError):
    """A valid credential asking for what its role may not have, e.g. a node reading a study
    it takes no part in."""


class NotFoundError(AipipeError):
    """A study, round, node or model version that does not exist."""

    exit_code = 12


class ConflictError(AipipeError):
    """A request that the current state forbids, e.g. opening a round while one is open."""

    exit_code = 13


class UpdateRejectedError(AipipeError):
    """An update the hub refuses; `reason` says why (audited at the hub)."""

    exit_code = 14


class StudyNotApprovedError(AipipeError):
    """The node has not approved this study (or approved a different version of it)."""

    exit_code = 15
