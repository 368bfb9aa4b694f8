"""The node's TLS client certificate (mutual TLS, `aipipe.hub.mtls`): its key is made here, at
enrolment and at each renewal, and never leaves the home; the hub signs a CSR for it.

<home>/client-key.pem   ECDSA P-256 key (0600, `write_private`; sealed in a home encrypted at
                        rest, as is the certificate, so the pair opens together)
<home>/client-cert.pem  its certificate: CN = the node's name, clientAuth, from the consortium CA

`aipipe node tls renew` swaps both for a new pair over the current connection (which, under
`mtls: required`, presents the current certificate): one command, any time before expiry. A
certificate that has expired no longer passes the hub's handshake: re-enrol the node then.
`due` says when renewal is wise: under a third of its lifetime left; `aipipe node start` then
renews it by itself (`Renewer`), and `node tls renew` is for a node that does not run a daemon.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from aipipe.errors import AipipeError, ConfigError, IdentityError
from aipipe.node.client import HubClient
from aipipe.pki import Issued, common_name, load_cert, make_csr
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.secure.keyfiles import file_label, read_private, write_private
from aipipe.settings import NodePaths
from aipipe.wire import ClientCert

CLIENT_KEY = "client-key.pem"
CLIENT_CERT = "client-cert.pem"
RENEW_WHEN_LEFT = 1 / 3


@dataclass(frozen=True)
class Pending:
    """A fresh key and the CSR the hub is asked to sign for it."""

    key: ec.EllipticCurvePrivateKey
    csr: str


def pending(name: str) -> Pending:
    key = ec.generate_private_key(ec.SECP256R1())
    return Pending(key, make_csr(key, name).decode())


def install(
    home: Path, name: str, request: Pending, answer: ClientCert, at_rest: AtRest = PLAIN
) -> x509.Certificate:
    """Check the hub's certificate (for our key and our name) and keep key and certificate."""
    cert = load_cert(answer.cert.encode(), "the client certificate the hub sent")
    if cert.public_key() != request.key.public_key() or common_name(cert) != name:
        raise IdentityError(
            f"the hub sent a client certificate for another key or name than node '{name}''s "
            "new key; nothing was "
            "changed: try again, and tell the hub's admin if it persists"
        )
    issued = Issued(cert, request.key)
    _replace(home / CLIENT_KEY, issued.key_pem(), "TLS client key", at_rest)
    _replace(home / CLIENT_CERT, issued.cert_pem(), "TLS client certificate", at_rest)
    return cert


def forget(home: Path) -> None:
    """Remove a client certificate of an earlier enrolment (the hub issued none this time)."""
    for name in (CLIENT_CERT, CLIENT_KEY):
        (home / name).unlink(missing_ok=True)


def load_pair(home: Path, at_rest: AtRest = PLAIN) -> tuple[bytes, bytes] | None:
    """The PEM certificate and key the node presents to the hub; None if it has none."""
    cert, key = home / CLIENT_CERT, home / CLIENT_KEY
    if not cert.is_file() and not key.is_file():
        return None
    return (
        read_private(cert, what="TLS client certificate", at_rest=at_rest),
        read_private(key, what="TLS client key", at_rest=at_rest),
    )


def current(home: Path, at_rest: AtRest = PLAIN) -> x509.Certificate:
    """The node's client certificate, or a ConfigError saying how to get one."""
    pair = load_pair(home, at_rest)
    if pair is None:
        raise ConfigError(
            f"the node at {home} has no TLS client certificate (it enrolled before the hub "
            "issued them, or with a hub that signs none); re-enrol it: on the hub, aipipe hub "
            "enrol-token --node <name> --replace; here, aipipe node enrol --home ... --token ..."
        )
    return load_cert(pair[0], str(home / CLIENT_CERT))


def due(cert: x509.Certificate, now: dt.datetime | None = None) -> bool:
    """Whether under a third of the certificate's lifetime is left."""
    now = now or dt.datetime.now(dt.UTC)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * RENEW_WHEN_LEFT


class Renewer:
    """Renews the client certificate of a running node once it is `due`: a daemon calls
    `check()` between work items (it looks at the certificate at most every `every_s`)."""

    def __init__(self, paths: NodePaths, client: HubClient, every_s: float = 3600.0) -> None:
        self.home, self.name, self.at_rest = paths.home, paths.config.name, paths.at_rest
        self.client, self.every_s = client, every_s
        self._next = 0.0

    def check(self) -> str | None:
        """Renew if due; a line saying so (or why renewal failed, to retry later), else None."""
        if time.monotonic() < self._next or load_pair(self.home, self.at_rest) is None:
            return None
        self._next = time.monotonic() + self.every_s
        if not due(current(self.home, self.at_rest)):
            return None
        request = pending(self.name)
        try:
            answer = self.client.renew_certificate(request.csr)
            cert = install(self.home, self.name, request, answer, self.at_rest)
        except AipipeError as exc:
            return f"TLS client certificate renewal failed, will retry: {exc}"
        pair = load_pair(self.home, self.at_rest)
        assert pair is not None
        self.client.present(pair)
        return f"TLS client certificate renewed, valid until {cert.not_valid_after_utc.isoformat()}"


def _replace(path: Path, data: bytes, what: str, at_rest: AtRest) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, data, what=what, at_rest=at_rest, label=file_label(path))
    os.replace(tmp, path)
