"""The hub's TLS files: the consortium CA `hub init` makes, the hub certificate it signs, its
rotation (`aipipe hub tls rotate`), and the CA an enrolment token pins.

<home>/ca-cert.pem   the consortium CA certificate (public: tokens carry it)
<home>/ca-key.pem    its private key (0600); signs hub certificates, never leaves the home
<home>/tls-cert.pem  the hub's certificate (serverAuth, the --tls-name SANs, 1 year)
<home>/tls-key.pem   its key (0600)

Rotation issues a new hub certificate from the same CA and replaces the two tls-* files; nodes
pin the CA, not the certificate, so they keep working once `hub serve` restarts. A new CA
(`--new-ca`) is not built: every node would have to re-enrol.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aipipe.errors import ConfigError
from aipipe.hub.home import HubPaths, save_hub_config
from aipipe.pki import (
    DEFAULT_NAMES,
    Issued,
    issue_server_cert,
    load_cert,
    make_ca,
    server_names,
    signed_by,
)
from aipipe.secure.keyfiles import read_private, write_private

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
TLS_CERT = "tls-cert.pem"
TLS_KEY = "tls-key.pem"


def create_consortium_tls(paths: HubPaths, names: Sequence[str] = DEFAULT_NAMES) -> Issued:
    """Make the consortium CA and a hub certificate for `names`; point hub.yaml at them."""
    ca = make_ca(paths.config.name)
    write_private(paths.home / CA_KEY, ca.key_pem(), what="consortium CA key")
    write_private(paths.home / CA_CERT, ca.cert_pem(), what="consortium CA certificate")
    paths.config.tls_ca = CA_CERT
    return _install(paths, ca, names)


def rotate(paths: HubPaths, names: Sequence[str] | None = None) -> Issued:
    """A new hub certificate from the home's CA, for `names` (default: the current
    certificate's names); a home without a CA (made before there was one) gets one."""
    if not (paths.home / CA_KEY).is_file():
        if paths.config.tls_cert is not None:
            raise ConfigError(
                f"hub.yaml tls_cert is {paths.config.tls_cert}, a certificate this hub did not "
                f"issue ({paths.home / CA_KEY} is missing): renew it with the CA that signed it, "
                "or remove tls_cert, tls_key and tls_ca from hub.yaml to let this command make a "
                "consortium CA"
            )
        return create_consortium_tls(paths, names or DEFAULT_NAMES)
    ca = load_ca(paths)
    return _install(paths, ca, names or _current_names(paths))


def load_ca(paths: HubPaths) -> Issued:
    cert = load_cert((paths.home / CA_CERT).read_bytes(), str(paths.home / CA_CERT))
    raw = read_private(paths.home / CA_KEY, what="consortium CA key")
    key = serialization.load_pem_private_key(raw, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{paths.home / CA_KEY} is not the EC key of the consortium CA")
    return Issued(cert, key)


def _current_names(paths: HubPaths) -> list[str]:
    path = paths.home / TLS_CERT
    names = server_names(load_cert(path.read_bytes(), str(path))) if path.is_file() else []
    return names or list(DEFAULT_NAMES)


def _install(paths: HubPaths, ca: Issued, names: Sequence[str]) -> Issued:
    """Issue, write tls-cert.pem/tls-key.pem (each replaced atomically), save hub.yaml."""
    issued = issue_server_cert(ca, names)
    _replace(paths.home / TLS_KEY, issued.key_pem(), "hub TLS key")
    _replace(paths.home / TLS_CERT, issued.cert_pem(), "hub TLS certificate")
    paths.config.tls_cert, paths.config.tls_key = TLS_CERT, TLS_KEY
    save_hub_config(paths.home, paths.config)
    return issued


def _replace(path: Path, data: bytes, what: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, data, what=what)
    os.replace(tmp, path)


def pinned_ca(paths: HubPaths) -> x509.Certificate | None:
    """The CA enrolment tokens pin: hub.yaml's tls_ca, which must have signed tls_cert (a node
    pinning it could not verify the hub otherwise). None for a home without tls_ca."""
    config = paths.config
    if config.tls_ca is None or config.tls_cert is None:
        return None
    ca_path = paths.home / config.tls_ca
    try:
        ca = load_cert(ca_path.read_bytes(), f"hub.yaml tls_ca ({ca_path})")
        served = paths.home / config.tls_cert
        cert = load_cert(served.read_bytes(), f"hub.yaml tls_cert ({served})")
    except OSError as exc:
        raise ConfigError(f"cannot read the hub's CA or certificate: {exc}") from exc
    if not signed_by(cert, ca):
        raise ConfigError(
            f"hub.yaml tls_ca ({ca_path}) did not sign tls_cert ({served}): a node pinning it "
            "would refuse the hub; set tls_ca to the CA that signed the certificate"
        )
    return ca
