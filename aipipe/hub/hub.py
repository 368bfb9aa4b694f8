"""`Hub`: a hub home as an object, for the admin's local operations (`aipipe hub ...`).

`Hub.open(home)` owns the paths, the store and the audit log, each opened on first use and
closed by `close()` (or the `with` block); what it changes it audits itself. The HTTP API is
the app in `aipipe.hub.app`, which opens the home on its own; `serve` runs it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aipipe.audit.log import AuditLog
from aipipe.errors import ConfigError, NotFoundError
from aipipe.hub.certs import (
    CA_CERT,
    TLS_CERT,
    TLS_KEY,
    create_consortium_tls,
    current_names,
    has_ca,
    install_hub_cert,
    load_ca,
    pinned_ca,
)
from aipipe.hub.enrolment import issue_token, token_expiry
from aipipe.hub.home import (
    HubPaths,
    init_hub,
    load_hub,
    read_hub_config,
    save_hub_config,
    served_url,
)
from aipipe.hub.people import People
from aipipe.pki import DEFAULT_NAMES, fingerprint, server_names
from aipipe.secure.at_rest import AtRest, AtRestConfig, AtRestKey
from aipipe.secure.identity import Identity
from aipipe.secure.rekey import Rotation, reseal_columns, reseal_files, rotate
from aipipe.store.hub_reputation import INITIAL_REPUTATION
from aipipe.store.hub_store import SEALED_COLUMNS, HubStore

OPERATOR = "admin/operator"  # the audit actor of people and token commands run on the hub home


@dataclass(frozen=True)
class IssuedToken:
    """A one-time enrolment token for `node` and when it expires."""

    node: str
    token: str
    expires_at: str | None


class Hub:
    """An opened hub home. Use as a context manager, or call `close()`."""

    def __init__(self, paths: HubPaths) -> None:
        self.paths = paths
        self._store: HubStore | None = None
        self._audit: AuditLog | None = None

    @classmethod
    def open(cls, home: Path, *, at_rest_key: AtRestKey | None = None) -> Hub:
        """The hub at `home` (NodeNotFoundError, saying to run `hub init`, if there is none);
        a home encrypted at rest needs its key (AtRestKeyError when missing or another)."""
        return cls(load_hub(home, at_rest_key))

    @classmethod
    def init(
        cls,
        home: Path,
        name: str,
        *,
        force: bool = False,
        tls_names: Sequence[str] = DEFAULT_NAMES,
        mtls: bool = False,
        at_rest_key: AtRestKey | None = None,
    ) -> tuple[Hub, str]:
        """Create a hub home with its consortium CA and a TLS certificate for `tls_names`
        (`mtls`: mutual TLS required; sealed at rest under `at_rest_key` if given); return it
        and the admin token (shown once, kept only hashed)."""
        paths, token = init_hub(
            home, name, force=force, tls_names=tls_names, mtls=mtls, at_rest_key=at_rest_key
        )
        return cls(paths), token

    def set_mtls(self, required: bool) -> None:
        """Require client certificates of nodes, or stop requiring them (hub.yaml `mtls`;
        `hub serve` applies it once restarted). Audited."""
        home, config = self.paths.home, self.paths.config
        if required and (config.tls_ca != CA_CERT or not has_ca(home)):
            raise ConfigError(
                f"mutual TLS needs the hub's own consortium CA (ca-cert.pem and ca-key.pem in "
                f"{home}, hub.yaml tls_ca: {CA_CERT}) to sign node certificates; make it with "
                f"`aipipe hub tls rotate --home {home}`"
            )
        config.mtls = "required" if required else "off"
        save_hub_config(home, config)
        self.audit.append(
            "admin", actor="admin", resource="hub/tls", details={"op": "mtls", "mtls": config.mtls}
        )

    def rotate_tls(self, names: Sequence[str] | None = None) -> x509.Certificate:
        """A new hub certificate from the consortium CA (`hub serve` uses it once restarted);
        a home made before there was a CA gets one."""
        home, config = self.paths.home, self.paths.config
        if config.tls_cert not in (None, TLS_CERT) or (config.tls_cert and not has_ca(home)):
            raise ConfigError(
                f"hub.yaml tls_cert is {config.tls_cert}, a certificate this hub did not issue: "
                "renew it with the CA that signed it, or remove tls_cert, tls_key and tls_ca "
                "from hub.yaml to let this command make (or use) the consortium CA"
            )
        if has_ca(home):
            ca = load_ca(home, at_rest=self.paths.at_rest)
            issued = install_hub_cert(
                home, ca, names or current_names(home), at_rest=self.paths.at_rest
            )
        else:
            issued = create_consortium_tls(
                home, config.name, names or DEFAULT_NAMES, at_rest=self.paths.at_rest
            )
        config.tls_cert, config.tls_key, config.tls_ca = TLS_CERT, TLS_KEY, CA_CERT
        save_hub_config(home, config)
        self.audit.append(
            "admin",
            actor="admin",
            resource="hub/tls",
            details={"op": "tls-rotate", "names": server_names(issued.cert),
                     "not_after": issued.cert.not_valid_after_utc.isoformat()},
        )  # fmt: skip
        return issued.cert

    def pinned_ca(self) -> x509.Certificate | None:
        """The CA enrolment tokens pin (hub.yaml tls_ca; None without one)."""
        config = self.paths.config
        return pinned_ca(self.paths.home, config.tls_ca, config.tls_cert)

    def ca_fingerprint(self) -> str | None:
        """SHA-256 of the CA enrolment tokens pin (None if the home has none)."""
        ca = self.pinned_ca()
        return None if ca is None else fingerprint(ca)

    @property
    def name(self) -> str:
        return self.paths.config.name

    @property
    def store(self) -> HubStore:
        if self._store is None:
            self._store = self.paths.open_store()
        return self._store

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            identity = Identity.load(self.paths.identity_key, at_rest=self.paths.at_rest)
            self._audit = AuditLog.open(self.paths.audit_log, identity, owner=f"hub/{self.name}")
        return self._audit

    @property
    def people(self) -> People:
        """People and API tokens; the operator on the hub machine acts as `OPERATOR`."""
        return People(self.store, self.audit, issuer=f"aipipe {self.name}")

    @property
    def is_open(self) -> bool:
        return self._store is not None or self._audit is not None

    def close(self) -> None:
        """Release the audit log and the store; idempotent."""
        audit, store = self._audit, self._store
        self._audit = self._store = None
        try:
            if audit is not None:
                audit.close()
        finally:
            if store is not None:
                store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def enrol_token(
        self, node: str, *, url: str | None = None, ttl_s: float, replace: bool = False
    ) -> IssuedToken:
        """A one-time enrolment token carrying `url` (default: where `serve` serves); with
        `replace` it re-enrols an enrolled node. Audited by `issue_token`."""
        hub_url = url or served_url(self.paths)
        ca = self.pinned_ca()
        ca_der = None if ca is None else ca.public_bytes(Encoding.DER)
        store, audit = self.store, self.audit
        token = issue_token(
            store, audit, node, hub_url, ttl_s=ttl_s, replace=replace, ca_der=ca_der
        )
        return IssuedToken(node, token, token_expiry(store, node))

    def nodes(self) -> list[dict[str, Any]]:
        """Enrolled nodes with their state, when they enrolled and were last seen, and their
        reputation (1 until a study's `detection` screens them) and how often they were flagged."""
        keys = ("name", "state", "enrolled_at", "last_seen")
        reputations = self.store.reputations()
        clean = {"reputation": INITIAL_REPUTATION, "flags": 0, "screened": 0}
        return [
            {**{key: row[key] for key in keys}, **reputations.get(row["name"], clean)}
            for row in self.store.nodes()
        ]

    def readmit(self, node: str) -> float:
        """Give a node its full reputation back (1), so that studies with `detection` select
        it again; audited as node.readmitted. Returns the reputation it had."""
        if not self.store.is_enrolled(node):
            raise NotFoundError(
                f"no node '{node}' is enrolled at this hub; `aipipe hub nodes` lists them"
            )
        previous = self.store.reset_reputation(node, INITIAL_REPUTATION)
        self.audit.append(
            "node.readmitted",
            actor="admin",
            resource=f"node/{node}",
            details={"previous": round(previous, 6), "reputation": INITIAL_REPUTATION},
        )
        return previous

    def serve(self, host: str, port: int, *, insecure_http: bool = False) -> None:
        """Serve the hub's HTTP API until interrupted (the app opens the home on its own)."""
        from aipipe.hub.serve import serve as run_server

        self.close()
        run_server(self.paths, host, port, insecure_http=insecure_http)

    @classmethod
    def rekey(cls, home: Path, old: AtRestKey, new: AtRestKey) -> Rotation:
        """Seal the hub home at `home` again under `new` (its blobs and private keys;
        `aipipe.secure.rekey`), audited as hub.rekey. Refused while `hub serve` runs."""
        from aipipe.hub.serve import lock_home

        paths = HubPaths(home, read_hub_config(home))  # opened for the rotation below

        def save(setting: AtRestConfig) -> None:
            paths.config.at_rest = setting
            save_hub_config(home, paths.config)

        lock = lock_home(paths)  # a ConflictError naming the process that serves the home
        try:
            done = rotate(f"hub home {home}", paths.config.at_rest, old, new, save=save,
                          reseal=functools.partial(_reseal_hub, paths))  # fmt: skip
        finally:
            os.close(lock)
        paths.at_rest = AtRest(new)
        with cls(paths) as hub:
            hub.audit.append("hub.rekey", actor="admin", resource=f"hub/{hub.name}",
                             details={"from": done.old_key_id, "to": done.new_key_id,
                                      "files": done.files, "rows": done.rows,
                                      "skipped": len(done.skipped)})  # fmt: skip
        return done


def _reseal_hub(paths: HubPaths, at_rest: AtRest, skipped: list[Path]) -> tuple[int, int]:
    files = reseal_files(paths.home, at_rest, skipped)
    store = HubStore.open(paths.store, paths.blobs, at_rest=at_rest)
    try:
        return files, reseal_columns(store.conn, SEALED_COLUMNS, at_rest)
    finally:
        store.close()
