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
    ├── IdentityError             key files missing, unreadable or with loose permissions
    ├── SignatureError            a signature that does not verify
    └── AuditChainBrokenError     an audit log whose hash chain does not verify
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
