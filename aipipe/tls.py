"""TLS for what aipipe serves (the hub, `node serve-cds`) and for a node's calls to its hub.

Serving: a certificate chain and its key (PEM) become an `ssl.SSLContext` that accepts TLS 1.3
only for the hub (`HUB_MIN_VERSION`), TLS 1.2 and newer for `node serve-cds` (EHR clients), with
Python's default cipher choice (forward-secret AEAD suites). `node serve-cds` serves plain HTTP
on a loopback address, and elsewhere only if the operator says `--insecure-http`; `hub serve`
serves plain HTTP only with `--insecure-http` on a loopback address (CDS Hooks 2.0: "the scheme
MUST be https when production data is exchanged").

Calling the hub: `HubTransport(ca_bundle, only=True)` (a node whose token pinned the
consortium CA) verifies the hub's certificate against that CA alone, TLS 1.3, hostname
checked; without `only` (the admin CLI's AIPIPE_HUB_CA, `node init --hub-ca`) against the
public CAs plus `ca_bundle`. Verification cannot be turned off, and a certificate that does not
verify is a `TlsVerifyError` naming the reason (expired, unknown CA, hostname mismatch), not an
"unreachable hub" that is retried.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
import httpx
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from aipipe.errors import ConfigError, TlsVerifyError
from aipipe.pki import signed_by
from aipipe.secure.at_rest import PLAIN, AtRest, is_sealed
from aipipe.secure.keyfiles import file_label

MIN_VERSION = ssl.TLSVersion.TLSv1_2
HUB_MIN_VERSION = ssl.TLSVersion.TLSv1_3


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerTls:
    """The certificate chain and key a server presents; `context()` is built once, at start."""

    cert: Path
    key: Path
    setting: str  # how the operator named them, for error messages
    minimum: ssl.TLSVersion = MIN_VERSION
    # With a CA file: clients that present a certificate must present one it signed (mutual
    # TLS, `aipipe.hub.mtls`); a client without one still connects (enrolment, health) and
    # the app decides. Only this CA is trusted for clients, never the system's.
    client_ca: Path | None = None
    at_rest: AtRest = PLAIN  # a key file sealed in a home encrypted at rest opens with it

    def context(self) -> ssl.SSLContext:
        for path in (self.cert, self.key):
            if not path.is_file():
                raise ConfigError(
                    f"{self.setting}: {path} is not a file; give the PEM files of the server's "
                    "certificate chain and its private key"
                )
        if self.client_ca is None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        else:
            context = _client_verifying(self.client_ca, self.setting)
        context.minimum_version = self.minimum
        try:
            with self._key_file() as key:
                context.load_cert_chain(self.cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{self.setting}: cannot load certificate {self.cert} with key {self.key} "
                f"({exc}); give a PEM certificate chain and the unencrypted PEM key that "
                "matches it"
            ) from exc
        return context

    @contextlib.contextmanager
    def _key_file(self) -> Iterator[Path]:
        """The key as a file `ssl` can load: the file itself, or, sealed at rest, its opened
        PEM in an anonymous in-memory file (memfd) that exists only while it is loaded."""
        sealed = self.key.read_bytes()
        if not is_sealed(sealed):
            yield self.key
            return
        pem = self.at_rest.open(sealed, file_label(self.key), where=f"TLS key {self.key}")
        fd = os.memfd_create("aipipe-tls-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            yield Path(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config keywords that serve with `context()` (uvicorn ≥ 0.47)."""
        context = self.context()

        def factory(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return context

        return {"ssl_context_factory": factory}


def _client_verifying(ca: Path, setting: str) -> ssl.SSLContext:
    """A server context that verifies a client certificate, when one is presented, against
    `ca` alone (no default trust store: PROTOCOL_TLS_SERVER loads none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_OPTIONAL
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{setting}: cannot load the CA {ca} that verifies client certificates ({exc}); "
            "give the consortium CA's PEM certificate (hub.yaml tls_ca)"
        ) from exc
    return context


def server_tls(
    cert: Path | None,
    key: Path | None,
    setting: str,
    minimum: ssl.TLSVersion = MIN_VERSION,
    *,
    client_ca: Path | None = None,
    at_rest: AtRest = PLAIN,
) -> ServerTls | None:
    """Both files or neither: a certificate without its key (or the reverse) is a ConfigError."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"{setting}: give both the certificate and its key, not one of them")
    tls = ServerTls(cert, key, setting, minimum, client_ca, at_rest)
    tls.context()  # unreadable or mismatched files fail here, before anything listens
    return tls


def require_tls_off_loopback(
    host: str, tls: ServerTls | None, *, insecure_http: bool, how: str
) -> None:
    """Raise `ConfigError` when plain HTTP would be served on an address other hosts can reach,
    unless the operator opted out (`insecure_http`). `how` says how to give a certificate."""
    if tls is not None or insecure_http or is_loopback(host):
        return
    shown = host if len(host) <= 64 else host[:63] + "…"
    raise ConfigError(
        f"refusing to serve plain HTTP on {shown!r}, an address other machines can reach: "
        f"tokens and patient data would cross the network unencrypted; {how}, bind to "
        "127.0.0.1, or pass --insecure-http if a TLS-terminating proxy is the only way in"
    )


def require_hub_tls(home: Path, host: str, tls: ServerTls | None, *, insecure_http: bool) -> None:
    """`hub serve` serves HTTPS; plain HTTP only with `insecure_http` on a loopback address."""
    if tls is None and not insecure_http:
        raise ConfigError(
            f"hub.yaml at {home} names no TLS certificate (tls_cert/tls_key), so the hub would "
            f"serve plain HTTP; make the consortium CA and a certificate with: aipipe hub tls "
            f"rotate --home {home} --tls-name <host nodes use>, or pass --insecure-http for "
            "development on a loopback address"
        )
    if insecure_http and not is_loopback(host):
        shown = host if len(host) <= 64 else host[:63] + "…"
        raise ConfigError(
            f"--insecure-http serves plain HTTP on a loopback address only, not {shown!r}: "
            "tokens and patient data would cross the network unencrypted; serve HTTPS "
            "(hub.yaml tls_cert/tls_key, `aipipe hub tls rotate`), or bind to 127.0.0.1 "
            "behind a TLS-terminating proxy on the same machine"
        )


def scheme(tls: ServerTls | None) -> str:
    return "http" if tls is None else "https"


def client_context(
    ca_bundle: Path | None, *, only: bool = False, client_pair: tuple[bytes, bytes] | None = None
) -> ssl.SSLContext:
    """Verify servers against the public CAs plus `ca_bundle`'s (a consortium's own CA); with
    `only`, against `ca_bundle` alone (the CA an enrolment token pinned), TLS 1.3. With
    `client_pair` (PEM certificate and key), present that client certificate (mutual TLS)."""
    if only and ca_bundle is None:
        raise ConfigError("a pinned hub CA needs its file; re-enrol the node with a new token")
    if only:  # no default trust store: PROTOCOL_TLS_CLIENT verifies, hostname checked
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    else:
        context = ssl.create_default_context(cafile=certifi.where())
    context.minimum_version = HUB_MIN_VERSION if only else MIN_VERSION
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the hub's CA bundle {ca_bundle} ({exc}); give a PEM file of CA "
                "certificates"
            ) from exc
    if client_pair is not None:
        _load_client_pair(context, *client_pair)
    return context


def _load_client_pair(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` from memory: ssl reads files only, so the PEM goes through an
    anonymous memory file (Linux), or else a private temporary file removed at once."""
    data = cert_pem.rstrip(b"\n") + b"\n" + key_pem
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("aipipe-client-cert", os.MFD_CLOEXEC)
            with open(fd, "wb", closefd=False) as handle:
                handle.write(data)
            try:
                context.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "client.pem"
            path.write_bytes(data)
            context.load_cert_chain(path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the node's TLS client certificate and key ({exc}); renew them "
            "(aipipe node tls renew) or re-enrol the node"
        ) from exc


class HubTransport(httpx.BaseTransport):
    """httpx's transport, verifying with `client_context(ca_bundle)`; a certificate or TLS
    failure becomes a ConfigError that says so (a hub that is down is still a TransportError,
    which the client retries)."""

    def __init__(
        self,
        ca_bundle: Path | None,
        *,
        only: bool = False,
        client_pair: tuple[bytes, bytes] | None = None,
    ) -> None:
        context = client_context(ca_bundle, only=only, client_pair=client_pair)
        self._inner = httpx.HTTPTransport(verify=context)
        self._client_pair = client_pair
        self._ca_bundle = ca_bundle
        self._only = only

    def present(self, client_pair: tuple[bytes, bytes]) -> None:
        """Present another client certificate from the next connection on (a renewed one);
        the connections open now finish with the old one."""
        context = client_context(self._ca_bundle, only=self._only, client_pair=client_pair)
        self._inner, self._client_pair = httpx.HTTPTransport(verify=context), client_pair

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self._inner.handle_request(request)
        except httpx.ConnectError as exc:
            problem = _tls_problem(exc)
            if problem is None:
                raise
            url = str(request.url.copy_with(path="/"))
            raise TlsVerifyError(self._explain(url, problem)) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            # A hub with mutual TLS that refuses our certificate closes the connection right
            # after the handshake, without a word (asyncio drops the TLS alert): say why
            # when our certificate is the likely reason, else it is an unreachable hub.
            problem = None if self._client_pair is None else client_cert_problem(
                self._client_pair[0], self._ca_bundle
            )  # fmt: skip
            if problem is None:
                raise
            url = str(request.url.copy_with(path="/"))
            raise TlsVerifyError(
                f"the hub at {url} closed the connection after the TLS handshake: it refuses "
                f"this node's client certificate, which {problem}; re-enrol the node (on the "
                "hub: aipipe hub enrol-token --node <name> --replace; here: aipipe node enrol "
                "--home <home> --token <token>). Renew a valid certificate before it expires "
                "with `aipipe node tls renew`"
            ) from exc

    def _explain(self, url: str, problem: str) -> str:
        if self._only:
            return (
                f"TLS to the hub at {url} failed: {problem} (trusted: only the consortium CA "
                f"pinned at enrolment, {self._ca_bundle}); the node will not talk to this "
                "server: if the hub's certificate was renewed, renew it from the same CA "
                "(`aipipe hub tls rotate`); if the consortium changed its CA, re-enrol the node "
                "with a new token"
            )
        trusted = (
            f"the public CAs and {self._ca_bundle}"
            if self._ca_bundle
            else "only the public CAs: no hub CA is set"
        )
        return (
            f"TLS to the hub at {url} failed: {problem} (trusted: {trusted}); if the hub's "
            "certificate comes from the consortium's own CA, give it to the node "
            "(`aipipe node init ... --hub-ca FILE`) or the CLI (AIPIPE_HUB_CA=FILE)"
        )

    def close(self) -> None:
        self._inner.close()


def client_cert_problem(cert_pem: bytes, ca_bundle: Path | None) -> str | None:
    """What a hub with mutual TLS would refuse in our client certificate (checked here, since
    the hub's refusal arrives as a closed connection): expiry, purpose, issuer."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "is not a PEM certificate"
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        return f"expired at {cert.not_valid_after_utc.isoformat()}"
    if cert.not_valid_before_utc > now:
        return f"is not valid before {cert.not_valid_before_utc.isoformat()}"
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        return "is not for client authentication (no clientAuth extended key usage)"
    if ca_bundle is not None and ca_bundle.is_file():
        cas = x509.load_pem_x509_certificates(ca_bundle.read_bytes())
        if not any(signed_by(cert, ca) for ca in cas):
            return (
                f"is not signed by the consortium CA this node pins ({ca_bundle}): unknown CA "
                f"(issuer {cert.issuer.rfc4514_string()[:120]})"
            )
    return None


# OpenSSL's X509_V_ERR_* codes → the reason in words.
_EXPIRED = {9: "not yet valid", 10: "expired"}
_UNKNOWN_CA = {2, 18, 19, 20, 21}
_HOSTNAME = {62, 64}


def _verify_reason(error: ssl.SSLCertVerificationError) -> str:
    code = error.verify_code
    if code in _EXPIRED:
        return f"certificate {_EXPIRED[code]}"
    if code in _UNKNOWN_CA:
        return "unknown CA: the certificate is not signed by a trusted CA"
    if code in _HOSTNAME:
        return "hostname mismatch: the certificate does not name the host in the hub URL"
    return "certificate rejected"


def _tls_problem(exc: BaseException) -> str | None:
    """What TLS said, if a TLS failure is behind `exc` (walking its causes)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"the hub's certificate did not verify: {_verify_reason(seen)} "
                f"({seen.verify_message})"
            )
        if isinstance(seen, ssl.SSLError):
            return f"the TLS handshake failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None
