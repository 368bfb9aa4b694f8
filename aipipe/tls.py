"""TLS for what aipipe serves (the hub, `node serve-cds`) and for a node's calls to its hub.

Serving: a certificate chain and its key (PEM) become an `ssl.SSLContext` that accepts TLS 1.2
and newer only, with Python's default cipher choice (forward-secret AEAD suites). Plain HTTP is
allowed on a loopback address (tests, a demo, a TLS-terminating proxy on the same machine); on
any other address it is refused unless the operator says `--insecure-http` (CDS Hooks 2.0:
"the scheme MUST be https when production data is exchanged").

Calling the hub: `hub_transport(ca_bundle)` verifies the hub's certificate against the usual
public CAs plus the consortium's own CA (`node init --hub-ca`); verification cannot be turned
off, and a certificate that does not verify is a `ConfigError` naming the problem, not an
"unreachable hub" that is retried.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
import httpx

from aipipe.errors import ConfigError

MIN_VERSION = ssl.TLSVersion.TLSv1_2


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

    def context(self) -> ssl.SSLContext:
        for path in (self.cert, self.key):
            if not path.is_file():
                raise ConfigError(
                    f"{self.setting}: {path} is not a file; give the PEM files of the server's "
                    "certificate chain and its private key"
                )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = MIN_VERSION
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{self.setting}: cannot load certificate {self.cert} with key {self.key} "
                f"({exc}); give a PEM certificate chain and the unencrypted PEM key that "
                "matches it"
            ) from exc
        return context

    def uvicorn_options(self) -> dict[str, Any]:
        """uvicorn.Config keywords that serve with `context()` (uvicorn ≥ 0.47)."""
        context = self.context()

        def factory(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
            return context

        return {"ssl_context_factory": factory}


def server_tls(cert: Path | None, key: Path | None, setting: str) -> ServerTls | None:
    """Both files or neither: a certificate without its key (or the reverse) is a ConfigError."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError(f"{setting}: give both the certificate and its key, not one of them")
    tls = ServerTls(cert, key, setting)
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


def scheme(tls: ServerTls | None) -> str:
    return "http" if tls is None else "https"


def client_context(ca_bundle: Path | None) -> ssl.SSLContext:
    """Verify servers against the public CAs plus `ca_bundle`'s (a consortium's own CA)."""
    context = ssl.create_default_context(cafile=certifi.where())
    context.minimum_version = MIN_VERSION
    if ca_bundle is not None:
        try:
            context.load_verify_locations(cafile=ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the hub's CA bundle {ca_bundle} ({exc}); give a PEM file of CA "
                "certificates"
            ) from exc
    return context


class HubTransport(httpx.BaseTransport):
    """httpx's transport, verifying with `client_context(ca_bundle)`; a certificate or TLS
    failure becomes a ConfigError that says so (a hub that is down is still a TransportError,
    which the client retries)."""

    def __init__(self, ca_bundle: Path | None) -> None:
        self._inner = httpx.HTTPTransport(verify=client_context(ca_bundle))
        self._ca_bundle = ca_bundle

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self._inner.handle_request(request)
        except httpx.ConnectError as exc:
            problem = _tls_problem(exc)
            if problem is None:
                raise
            raise ConfigError(self._explain(str(request.url.copy_with(path="/")), problem)) from exc

    def _explain(self, url: str, problem: str) -> str:
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


def _tls_problem(exc: BaseException) -> str | None:
    """What TLS said, if a TLS failure is behind `exc` (walking its causes)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"the hub's certificate did not verify: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return f"the TLS handshake failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None
