"""The aipipe exception tree.

Every error a user can cause or fix derives from `AipipeError`; the CLI maps it to one red line
and a non-zero exit code (``aipipe.cli.render.fail``). Foreign exceptions are translated where
they enter (``raise FhirServerError(...) from exc``), never logged and re-raised.

    AipipeError                   exit 1, HTTP 400 unless a class below says otherwise
    ├── ConfigError               bad settings, node home missing or already there
    │   ├── NodeExistsError
    │   ├── NodeNotFoundError
    │   └── TlsVerifyError        the hub's certificate did not verify (expired, unknown CA, …)
    ├── StudyError                (422) study YAML invalid or unusable on this node's data
    ├── SourceError               an input path that cannot be read at all
    ├── FhirServerError           a FHIR server unreachable or answering with errors
    ├── StoreError                the SQLite store is corrupt or of a newer schema
    │   └── BlobIntegrityError    (500) a stored blob is missing or does not hash to it
    ├── IdentityError             key files missing, unreadable or with loose permissions
    │   ├── AtRestKeyError        the at-rest key of an encrypted home missing, wrong or loose
    │   └── SealedDataError       sealed data that does not open: tampered or moved
    ├── SignatureError            a signature that does not verify
    ├── AuditChainBrokenError     an audit log whose hash chain does not verify
    ├── HubUnavailableError       the hub cannot be reached
    ├── AuthError                 (401) missing, wrong or insufficient credentials
    │   ├── ForbiddenError        (403) a valid credential outside its scope
    │   └── ThrottledError        (429) too many failed logins from one address
    ├── NotFoundError             (404) a study, round, node or model that does not exist
    ├── ConflictError             (409) a request the current state forbids (round already open)
    ├── UpdateRejectedError       (409) an update the hub refuses (bad signature, replay, late, …)
    ├── StudyNotApprovedError     a node asked to train for a study it has not approved
    ├── AggregationError          (aipipe.aggregation) unusable update, sum or setting
    ├── SecureAggregationError    (aipipe.secure.errors) exit 16: masks, shares, CKKS contexts
    ├── PrivacyError              (aipipe.privacy.errors) exit 17, e.g. BudgetExhaustedError
    ├── ModelError                (aipipe.models.errors) exit 18: weights that fit no model
    └── WireDecodeError           exit 19: bytes that are no frame (aipipe.wire.frames.FrameError)
                                  or no safetensors blob (aipipe.wire.tensors.TensorDecodeError)

Each class declares its exit code and HTTP status once (`exit_code`, `http_status`, inherited
by its subclasses); the CLI exits with the one (``aipipe.cli.render.fail``), the hub answers the
other with `error_body` (``{"error": <class name>, "detail": <message>}``), and the node's
`HubClient` rebuilds the same class from the name with `error_from_body`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal


class AipipeError(Exception):
    """Base class of every error that aipipe reports to a user without a traceback."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 400  # what the hub answers when a request raises it


class ConfigError(AipipeError):
    """Settings or a home directory are missing, malformed or in the way."""

    exit_code = 2


class NodeExistsError(ConfigError):
    """`node init` would overwrite an existing node."""


class NodeNotFoundError(ConfigError):
    """A command names a node home that has not been initialised."""


class TlsVerifyError(ConfigError):
    """The hub's TLS certificate did not verify against the CA the node pins (expired, signed
    by another CA, issued for another host) or the TLS handshake failed: not retried."""


class StudyError(AipipeError):
    """A study definition is invalid, or cannot be applied to this node's data."""

    exit_code = 3
    http_status = 422


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

    http_status = 500


class IdentityError(AipipeError):
    """A key file is missing, unreadable or readable by others."""

    exit_code = 7


class AtRestKeyError(IdentityError):
    """An encrypted home opened without its at-rest key, with another key, or with a key file
    others can read (aipipe.secure.at_rest)."""


class SealedDataError(IdentityError):
    """Data sealed at rest (AES-256-GCM) that does not open under its key: tampered with,
    truncated, or moved from where it was sealed."""


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
    http_status = 401


class ForbiddenError(AuthError):
    """A valid credential asking for what its role may not have, e.g. a node reading a study
    it takes no part in."""

    http_status = 403


class ThrottledError(AuthError):
    """Too many failed logins from one address: refused before any password is checked;
    `retry_after_s` says when the oldest failure leaves the window (the hub's `Retry-After`)."""

    http_status = 429

    def __init__(self, message: str, retry_after_s: int = 60) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFoundError(AipipeError):
    """A study, round, node or model version that does not exist."""

    exit_code = 12
    http_status = 404


class ConflictError(AipipeError):
    """A request that the current state forbids, e.g. opening a round while one is open."""

    exit_code = 13
    http_status = 409


RefusalCategory = Literal["signature", "duplicate", "bounds", "stale", "malformed", "protocol"]
"""Why the hub refused an update or a secure-round message, in a fixed vocabulary (what its
metrics export: the free-text reason may name a node, a tensor or a value). `protocol` is any
other refusal: a secure round's step out of turn, unusable keys, a refused decrypted sum."""


class UpdateRejectedError(AipipeError):
    """An update the hub refuses; the message says why (audited at the hub), `category` in
    which fixed class of refusal it falls."""

    exit_code = 14
    http_status = 409

    category: RefusalCategory = "protocol"

    @classmethod
    def of(cls, reason: str, category: RefusalCategory) -> UpdateRejectedError:
        """The refusal `reason`, in `category` (the constructor keeps to the message, as every
        error's does, so that it crosses HTTP as itself: `error_from_body`)."""
        error = cls(reason)
        error.category = category
        return error


class StudyNotApprovedError(AipipeError):
    """The node has not approved this study (or approved a different version of it)."""

    exit_code = 15


class WireDecodeError(AipipeError):
    """Bytes from the wire or a store that do not decode: no frame, or no safetensors blob."""

    exit_code = 19


# -- the table: one place that maps a class to its status and back -------------------------------


def _tree(root: type[AipipeError] = AipipeError) -> Iterator[type[AipipeError]]:
    """`root` and every subclass loaded in this process, parents before children, in the
    order they were defined."""
    yield root
    for sub in root.__subclasses__():
        yield from _tree(sub)


def error_table() -> dict[str, tuple[int, int]]:
    """Class name → (HTTP status, exit code) for every `AipipeError` loaded."""
    return {cls.__name__: (cls.http_status, cls.exit_code) for cls in _tree()}


ERROR_MODULES = ("aipipe.privacy.errors", "aipipe.models.errors")
"""Modules whose errors the hub may answer with, loaded on the first name not yet known (they
pull in torch, which a CLI command answered without an error never needs)."""


def error_class(name: str) -> type[AipipeError] | None:
    """The `AipipeError` subclass called `name` (only those: a name never builds any other
    class), loading `ERROR_MODULES` if it is not among the classes loaded so far."""
    found = next((cls for cls in _tree() if cls.__name__ == name), None)
    if found is None:
        for module in ERROR_MODULES:
            importlib.import_module(module)
        found = next((cls for cls in _tree() if cls.__name__ == name), None)
    return found


def error_body(exc: AipipeError) -> dict[str, str]:
    """What the hub answers (with `exc.http_status`): the class name and the message."""
    return {"error": type(exc).__name__, "detail": str(exc)}


def error_from_body(status: int, body: Mapping[str, Any], message: str) -> AipipeError:
    """The error a hub answer stands for, carrying `message`.

    The class comes from the body's `error` name. An unknown name (a newer hub) or none (an
    older hub, a framework 404) falls back on a 4xx status: the most general class declaring
    it; anything else is a plain `AipipeError`. A class whose constructor takes more than a
    message comes back as its nearest ancestor that takes only one (its extra fields do not
    cross the wire).
    """
    name = body.get("error")
    cls = error_class(name) if isinstance(name, str) else None
    if cls is None and status < 500:
        declaring = (c for c in _tree() if c.http_status == status)
        cls = min(declaring, key=lambda c: len(c.__mro__), default=None)
    cls = cls or AipipeError
    while cls is not AipipeError and _takes_more_than_a_message(cls):
        cls = next(base for base in cls.__bases__ if issubclass(base, AipipeError))
    return cls(message)


def _takes_more_than_a_message(cls: type[AipipeError]) -> bool:
    return any(
        "__init__" in vars(klass)
        for klass in cls.__mro__
        if issubclass(klass, AipipeError) and klass is not AipipeError
    )
