"""The hub's TLS files: the consortium CA `hub init` makes, the hub certificate it signs, its
rotation (`aipipe hub tls rotate`), and the CA an enrolment token pins.

<home>/ca-cert.pem   the consortium CA certificate (public: tokens carry it)
<home>/ca-key.pem    its private key (0600); signs hub certificates, never leaves the home
<home>/tls-cert.pem  the hub's certificate (serverAuth, the --tls-name SANs, 1 year)
<home>/tls-key.pem   its key (0600)

Rotation issues a new hub certificate from the same CA and replaces the two tls-* files; nodes
pin the CA, not the certificate, so they keep working once `hub serve` restarts. A new CA
(`--new-ca`) is not built: every node would have to re-enrol. hub.yaml names the files
(`tls_cert`, `tls_key`, `tls_ca`); `aipipe.hub.home` and `aipipe.hub.hub` keep it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aipipe.errors import ConfigError
from aipipe.pki import (
    DEFAULT_NAMES,
    Issued,
    issue_server_cert,
    load_cert,
    make_ca,
    server_names,
    signed_by,
)
from aipipe.secure.at_rest import PLAIN, AtRest
from aipipe.secure.keyfiles import file_label, read_private, write_private

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
TLS_CERT = "tls-cert.pem"
TLS_KEY = "tls-key.pem"


def create_consortium_tls(
    home: Path, consortium: str, names: Sequence[str] = DEFAULT_NAMES, *, at_rest: AtRest = PLAIN
) -> Issued:
    """Write the consortium CA (its key sealed under `at_rest`) and a hub certificate for
    `names` into `home`."""
    ca = make_ca(consortium)
    write_private(home / CA_KEY, ca.key_pem(), what="consortium CA key", at_rest=at_rest)
    write_private(home / CA_CERT, ca.cert_pem(), what="consortium CA certificate")
    return install_hub_cert(home, ca, names, at_rest=at_rest)


def has_ca(home: Path) -> bool:
    return (home / CA_KEY).is_file() and (home / CA_CERT).is_file()


def load_ca(home: Path, *, at_rest: AtRest = PLAIN) -> Issued:
    """The consortium CA of the hub home (certificate and key, opened with `at_rest`)."""
    cert = load_cert((home / CA_CERT).read_bytes(), str(home / CA_CERT))
    raw = read_private(home / CA_KEY, what="consortium CA key", at_rest=at_rest)
    key = serialization.load_pem_private_key(raw, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{home / CA_KEY} is not the EC key of the consortium CA")
    return Issued(cert, key)


def current_names(home: Path) -> list[str]:
    """The names the home's hub certificate is for (default names if it has none)."""
    path = home / TLS_CERT
    names = server_names(load_cert(path.read_bytes(), str(path))) if path.is_file() else []
    return names or list(DEFAULT_NAMES)


def install_hub_cert(
    home: Path, ca: Issued, names: Sequence[str], *, at_rest: AtRest = PLAIN
) -> Issued:
    """Issue a hub certificate for `names`; replace tls-cert.pem/tls-key.pem atomically (the
    key sealed under `at_rest`)."""
    issued = issue_server_cert(ca, names)
    _replace(home / TLS_KEY, issued.key_pem(), "hub TLS key", at_rest)
    _replace(home / TLS_CERT, issued.cert_pem(), "hub TLS certificate")
    return issued


def _replace(path: Path, data: bytes, what: str, at_rest: AtRest = PLAIN) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, data, what=what, at_rest=at_rest, label=file_label(path))
    os.replace(tmp, path)


def pinned_ca(home: Path, tls_ca: str | None, tls_cert: str | None) -> x509.Certificate | None:
    """The CA enrolment tokens pin: hub.yaml's tls_ca, which must have signed tls_cert (a node
    pinning it could not verify the hub otherwise). None for a home without both."""
    if tls_ca is None or tls_cert is None:
        return None
    ca_path, served = home / tls_ca, home / tls_cert
    try:
        ca = load_cert(ca_path.read_bytes(), f"hub.yaml tls_ca ({ca_path})")
        cert = load_cert(served.read_bytes(), f"hub.yaml tls_cert ({served})")
    except OSError as exc:
        raise ConfigError(f"cannot read the hub's CA or certificate: {exc}") from exc
    if not signed_by(cert, ca):
        raise ConfigError(
            f"hub.yaml tls_ca ({ca_path}) did not sign tls_cert ({served}): a node pinning it "
            "would refuse the hub; set tls_ca to the CA that signed the certificate"
        )
    return ca
