"""Mutual TLS for the hub (hub.yaml `mtls: required`): a node's credential counts only when the
connection also presents that node's client certificate.

The TLS layer (`aipipe.tls.ServerTls` with `client_ca`) asks every client for a certificate
and, when one is presented, verifies it against the consortium CA alone (expired, another CA,
or not for client authentication: the handshake fails). A client without a certificate still
connects (ssl.CERT_OPTIONAL): a node enrols (/v1/enrol, one-time token) before it has one, and
health probes, people (admin, scientist, auditor: their tokens are not bound to certificates)
and CDS Hooks clients (their own JWT) have none. The app then binds node credentials to
certificates: every request authenticated as node N must come over a connection whose verified
client certificate says CN=N; otherwise 403, audited as auth.refused.

uvicorn (0.55, h11) does not pass the peer certificate to the app, so `PeerCertProtocol` adds
the ASGI TLS extension (scope["extensions"]["tls"], `client_cert_chain` and `client_cert_name`)
to every request of a connection, read from the transport's SSL object once the handshake is
done.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import MutableMapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from uvicorn.protocols.http.h11_impl import H11Protocol

from aipipe.errors import ForbiddenError
from aipipe.hub.principal import Principal
from aipipe.pki import common_name

Scope = MutableMapping[str, Any]
PUBLIC_PATHS = frozenset({"/v1/enrol", "/healthz", "/readyz"})


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection: its verified client certificate, if any."""
    ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    cert = None if der is None else x509.load_der_x509_certificate(der)
    return {
        "server_cert": None,
        "client_cert_chain": [] if cert is None else [cert.public_bytes(Encoding.PEM).decode()],
        "client_cert_name": None if cert is None else cert.subject.rfc4514_string(),
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None,
    }


class PeerCertProtocol(H11Protocol):
    """uvicorn's h11 protocol, telling the app which client certificate the connection has."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        extension = tls_extension(transport)
        if extension is None:
            return
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = extension
            await inner(scope, receive, send)

        self.app = app


def peer_node(scope: Scope) -> str | None:
    """The node name (CN) of the connection's verified client certificate, if it has one."""
    chain = (scope.get("extensions") or {}).get("tls", {}).get("client_cert_chain") or []
    if not chain:
        return None
    return common_name(x509.load_pem_x509_certificate(chain[0].encode()))


def require_node_cert(scope: Scope, who: Principal) -> None:
    """With mtls required, a node credential must come with that node's certificate (403 and
    audited otherwise). People and hubs without mTLS pass."""
    service = scope["app"].state.service
    if who.kind != "node" or service.paths.config.mtls != "required":
        return
    presented = peer_node(scope)
    if presented == who.name:
        return
    if presented is None:
        reason = (
            f"this hub requires mutual TLS and node '{who.name}' presented no client "
            "certificate with its credential"
        )
        advice = (
            f"a node enrolled before mTLS was turned on has none: re-enrol it (on the hub: "
            f"aipipe hub enrol-token --node {who.name} --replace; on the node: aipipe node "
            "enrol --home <home> --token <token>)"
        )
    else:
        reason = (
            f"the client certificate is node '{presented}''s but the credential is node "
            f"'{who.name}''s"
        )
        advice = "a node's credential works only with its own certificate and key"
    method, path = scope.get("method", "?"), scope.get("path", "?")
    service.audit_refusal(who, method, path, reason)
    raise ForbiddenError(f"{reason}; {advice}")


def authenticate(scope: Scope, token: str | None) -> Principal:
    """`HubService.authenticate`, then the certificate binding of `require_node_cert`."""
    who: Principal = scope["app"].state.service.authenticate(token)
    require_node_cert(scope, who)
    return who
