"""Nodes' TLS client certificates, signed by the consortium CA: at enrolment (the CSR in
`EnrolRequest.client_csr`) and on renewal (`POST /v1/node/certificate`, `aipipe node tls
renew`).

A certificate says CN=<node name>, is for client authentication only (not a CA) and lives
hub.yaml `client_cert_days` (90 by default). The hub signs only a CSR for the asking node's own
name, with a P-256 key, whose signature verifies (`aipipe.pki.check_csr`); a refusal is
audited. A hub whose tls_ca is not its own consortium CA (ca-key.pem in the home) signs none:
the enrolment answer then carries no certificate, and `mtls: required` cannot be used.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aipipe.audit.log import AuditLog
from aipipe.errors import AipipeError, ConfigError
from aipipe.hub.certs import CA_CERT, has_ca, load_ca
from aipipe.hub.home import HubPaths
from aipipe.pki import check_csr, fingerprint, issue_client_cert
from aipipe.wire import ClientCert


class ClientCerts:
    def __init__(self, paths: HubPaths, audit: AuditLog) -> None:
        self.paths = paths
        self.audit = audit

    def can_sign(self) -> bool:
        """Whether this hub signs node certificates (its tls_ca is its own consortium CA)."""
        return self.paths.config.tls_ca == CA_CERT and has_ca(self.paths.home)

    def check(
        self, node: str, csr_pem: str | None, action: str
    ) -> x509.CertificateSigningRequest | None:
        """The node's CSR, checked (None when it sent none or this hub signs none); a refusal
        is audited as `action` and raised (400)."""
        if csr_pem is None or not self.can_sign():
            return None
        try:
            return check_csr(csr_pem, node)
        except AipipeError as exc:
            self.audit.append(
                action,
                actor=node,
                resource=f"node/{node}",
                outcome="refused",
                details={"reason": f"client CSR refused: {exc}"[:300]},
            )
            raise

    def issue(
        self, node: str, csr: x509.CertificateSigningRequest | None, op: str
    ) -> ClientCert | None:
        """Sign `csr` for `node` (audited as node.cert_issued); None without a CSR."""
        if csr is None:
            return None
        cert = issue_client_cert(
            load_ca(self.paths.home, at_rest=self.paths.at_rest),
            csr,
            node,
            days=self.paths.config.client_cert_days,
        )
        not_after = cert.not_valid_after_utc.isoformat()
        self.audit.append(
            "node.cert_issued",
            actor=node,
            resource=f"node/{node}",
            details={"op": op, "serial": f"{cert.serial_number:x}", "not_after": not_after,
                     "sha256": fingerprint(cert)},
        )  # fmt: skip
        return ClientCert(cert=cert.public_bytes(Encoding.PEM).decode(), not_after=not_after)

    def renew(self, node: str, csr_pem: str) -> ClientCert:
        """A new certificate for an authenticated node (its current one, under mtls required)."""
        if not self.can_sign():
            raise ConfigError(
                "this hub does not sign node certificates: its hub.yaml tls_ca is not the "
                "consortium CA it made (ca-cert.pem with ca-key.pem in the hub home)"
            )
        issued = self.issue(node, self.check(node, csr_pem, "node.cert_refused"), "renew")
        assert issued is not None
        return issued
