"""A consortium's own certificate authority: the CA that `aipipe hub init` makes, the hub's
server certificates it signs, and the SHA-256 fingerprint an enrolment token pins.

Keys are ECDSA P-256 (every TLS 1.3 stack takes them; Ed25519 certificates are not yet
accepted by all). The CA is valid 10 years, may sign end-entity certificates only
(`pathlen 0`, keyCertSign + cRLSign); a hub certificate is valid 1 year, for serverAuth, and
names the DNS names and IP addresses the nodes use (subjectAltName), hostname checked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aipipe.errors import ConfigError

CA_DAYS = 3650
SERVER_DAYS = 365
DEFAULT_NAMES = ("localhost", "127.0.0.1")
_BACKDATE = dt.timedelta(minutes=5)  # a little clock skew between hub and node


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lower-case hex: what an enrolment token pins."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_cert(data: bytes, what: str) -> x509.Certificate:
    """The first certificate of a PEM file (or DER bytes); a ConfigError naming `what` if none."""
    try:
        if data.lstrip().startswith(b"-----"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ConfigError(f"{what} is not an X.509 certificate (PEM or DER): {exc}") from exc


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(days: int, start: dt.datetime | None = None) -> x509.CertificateBuilder:
    """A builder with a random serial, valid `days` from `start` (default: now, less a little
    clock skew)."""
    begin = start or dt.datetime.now(dt.UTC) - _BACKDATE
    return (
        x509.CertificateBuilder()
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(begin)
        .not_valid_after(begin + dt.timedelta(days=days))
    )


def make_ca(consortium: str, *, days: int = CA_DAYS) -> Issued:
    """A self-signed consortium CA that may sign end-entity certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"aipipe consortium CA {consortium}")
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        _validity(days)
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def subject_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses for a subjectAltName; at least one, each a plain host."""
    if not names:
        raise ConfigError("a hub certificate needs at least one --tls-name (DNS name or IP)")
    general: list[x509.GeneralName] = []
    for raw in names:
        name = raw.strip().strip("[]")
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
            continue
        except ValueError:
            pass
        if not name or any(c in name for c in "/:@ \t") or len(name) > 253:
            raise ConfigError(
                f"--tls-name {raw[:80]!r} is neither a DNS name nor an IP address; give the "
                "host the nodes use in the hub URL, e.g. hub.example.org or 10.0.0.5"
            )
        general.append(x509.DNSName(name.lower()))
    return general


def issue_server_cert(
    ca: Issued,
    names: Sequence[str],
    *,
    days: int = SERVER_DAYS,
    valid_from: dt.datetime | None = None,
) -> Issued:
    """A hub (TLS server) certificate for `names`, signed by `ca`. `valid_from` (tests) sets
    the start of its validity instead of now."""
    key = ec.generate_private_key(ec.SECP256R1())
    alt = subject_names(names)
    builder = (
        _validity(days, valid_from)
        .subject_name(_name(names[0].strip().strip("[]")))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def server_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's subjectAltName lists (for rotation)."""
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    dns = alt.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)]
    return [*dns, *ips]


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether `ca` issued `cert` (its signature verifies under the CA's key)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


# -- node (TLS client) certificates -----------------------------------------------------------

CLIENT_DAYS = 90
MAX_CLIENT_DAYS = 825
MAX_CSR_BYTES = 4096


def make_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> bytes:
    """A PEM certificate signing request for `common_name` (a node's name), signed by `key`."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def check_csr(pem: str, common_name: str) -> x509.CertificateSigningRequest:
    """A node's CSR, refused (ConfigError) unless it is one PEM request, signed by its own key,
    for a P-256 key, whose subject is CN=`common_name` and nothing else."""
    if len(pem) > MAX_CSR_BYTES:
        raise ConfigError(f"the client CSR is {len(pem)} characters, over {MAX_CSR_BYTES}")
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except ValueError as exc:
        raise ConfigError(f"the client CSR is not a PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise ConfigError("the client CSR's signature does not verify under its own key")
    try:
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"the client CSR's key is of a kind aipipe does not take: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError(
            f"the client CSR's key is {type(key).__name__}, not ECDSA P-256; re-run the "
            "command with this version of aipipe, which makes a P-256 key"
        )
    if csr.subject != _name(common_name):
        raise ConfigError(
            f"the client CSR is for {csr.subject.rfc4514_string()[:120]!r}, not "
            f"'CN={common_name}': a node may only ask for a certificate in its own name"
        )
    return csr


def issue_client_cert(
    ca: Issued,
    csr: x509.CertificateSigningRequest,
    common_name: str,
    *,
    days: int = CLIENT_DAYS,
    valid_from: dt.datetime | None = None,
) -> x509.Certificate:
    """A node's TLS client certificate: CN=`common_name`, clientAuth only, not a CA, for the
    CSR's key (`check_csr` first). Only the key comes from the CSR; everything else is ours."""
    if not 1 <= days <= MAX_CLIENT_DAYS:
        raise ConfigError(f"a client certificate lives 1 to {MAX_CLIENT_DAYS} days, not {days}")
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    builder = (
        _validity(days, valid_from)
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), False
        )
    )
    return builder.sign(ca.key, hashes.SHA256())


def common_name(cert: x509.Certificate) -> str | None:
    """The certificate's subject CN (a node's name for a client certificate)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if len(names) == 1 else None
