"""The hub home: config, identity, store, blobs and audit log of one consortium's hub.

<home>/hub.yaml        HubConfig
<home>/identity.key    Ed25519 key (0600): signs audit checkpoints
<home>/cds-link.key    HMAC key (0600), made at first serve: signs model card links
<home>/hub.sqlite      HubStore
<home>/blobs/          content-addressed model weights
<home>/audit.sqlite    hash-chained audit log
<home>/serve.json      written by `hub serve` once it listens: {"url", "pid"} (https with TLS)
<home>/serve.lock      held (flock) by the one `hub serve` of this home while it runs
<home>/ca-cert.pem     the consortium CA (`hub init`); ca-key.pem its key, never leaves the home
<home>/tls-cert.pem    the hub's TLS certificate, signed by it; tls-key.pem its key

The home is 0700 and every file in it 0600. A home made with an at-rest key (`hub init
--at-rest-key-file`) seals the model blobs, identity.key, ca-key.pem and cds-link.key under it
(`aipipe.secure.at_rest`); hub.yaml records the key's id, never the key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aipipe.errors import ConfigError, NodeExistsError, NodeNotFoundError
from aipipe.fhir.base_url import ServerBase
from aipipe.hub.certs import CA_CERT, TLS_CERT, TLS_KEY, create_consortium_tls
from aipipe.pki import CLIENT_DAYS, DEFAULT_NAMES, MAX_CLIENT_DAYS
from aipipe.secure.at_rest import PLAIN, AtRest, AtRestConfig, AtRestKey, home_at_rest
from aipipe.secure.identity import Identity
from aipipe.secure.keyfiles import write_private
from aipipe.store.hub_nodes import secret_hash
from aipipe.store.hub_people import BOOTSTRAP
from aipipe.store.hub_store import HubStore
from aipipe.tls import HUB_MIN_VERSION, ServerTls, server_tls

HUB_CONFIG = "hub.yaml"
SERVE_INFO = "serve.json"
SERVE_LOCK = "serve.lock"


class HubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    created: str
    default_deadline_s: float = Field(default=600.0, gt=0)
    # CDS Hooks: allowed client issuers → their JWK Sets; empty answers every CDS call 401
    # unless cds_allow_unauthenticated (refused by `hub serve` off a loopback address).
    cds_clients: dict[str, dict[str, Any]] = Field(default_factory=dict)
    cds_base_url: str | None = None
    cds_allow_unauthenticated: bool = False
    # How long the signed model card link on an issued card opens without a JWT (seconds).
    cds_link_lifetime_s: float = Field(default=24 * 3600.0, gt=0, le=90 * 24 * 3600.0)
    # FHIR base URLs (https) a CDS request's fhirServer may name; empty: none is ever read.
    cds_fhir_servers: list[str] = Field(default_factory=list)
    # PEM file of extra CAs for those servers (relative to the home); verification stays on.
    cds_fhir_ca_bundle: str | None = None
    # PEM certificate chain and key (relative to the home) `hub serve` serves HTTPS with
    # (`hub init` makes them, `hub tls rotate` renews them); without them it serves nothing,
    # or plain HTTP on a loopback address with --insecure-http.
    tls_cert: str | None = None
    tls_key: str | None = None
    # PEM of the CA that signed tls_cert: enrolment tokens carry it and its SHA-256, and
    # nodes trust only it (aipipe.hub.certs). `hub init` makes it (ca-cert.pem).
    tls_ca: str | None = None
    # Mutual TLS (aipipe.hub.mtls): "required" makes `hub serve` ask every client for a
    # certificate from tls_ca and refuse a node credential without its own node's certificate
    # (`hub init --mtls`, `hub tls mtls on|off`). Nodes get one at enrolment either way.
    mtls: Literal["off", "required"] = "off"
    # How long a node's client certificate lives (days); `aipipe node tls renew` renews it.
    client_cert_days: int = Field(default=CLIENT_DAYS, ge=1, le=MAX_CLIENT_DAYS)
    # Serve /docs (Swagger UI, assets from the hub) and /openapi.json to anyone; else
    # /openapi.json needs the admin token and there is no /docs.
    api_docs: bool = False
    # Set by `hub init --at-rest-key-file`: the id of the key the home is sealed under.
    at_rest: AtRestConfig | None = None

    @field_validator("cds_fhir_servers")
    @classmethod
    def _https_bases(cls, servers: list[str]) -> list[str]:
        for server in servers:
            try:
                base = ServerBase.parse(server)
            except ValueError as exc:
                raise ValueError(f"cds_fhir_servers entry {server!r}: {exc}") from None
            if base.scheme != "https":
                raise ValueError(f"cds_fhir_servers entry {server!r} must use https")
        return servers


class HubPaths:
    def __init__(self, home: Path, config: HubConfig, at_rest: AtRest = PLAIN) -> None:
        self.home = home
        self.config = config
        self.at_rest = at_rest  # how the home's private files rest (aipipe.secure.at_rest)
        self.identity_key = home / "identity.key"
        self.cds_link_key = home / "cds-link.key"
        self.store = home / "hub.sqlite"
        self.blobs = home / "blobs"
        self.audit_log = home / "audit.sqlite"
        self.serve_info = home / SERVE_INFO
        self.serve_lock = home / SERVE_LOCK

    def open_store(self) -> HubStore:
        return HubStore.open(self.store, self.blobs, at_rest=self.at_rest)

    def tls(self) -> ServerTls | None:
        """hub.yaml's tls_cert and tls_key (relative to the home), loaded; None without them.
        With `mtls: required`, clients are verified against tls_ca (and it alone)."""
        cert, key, ca = self.config.tls_cert, self.config.tls_key, self.config.tls_ca
        if self.config.mtls == "required" and ca is None:
            raise ConfigError(
                f"hub.yaml at {self.home} says mtls: required but names no tls_ca to verify "
                "node certificates with; make the consortium CA with `aipipe hub tls rotate "
                f"--home {self.home}`, or set mtls: off"
            )
        return server_tls(
            None if cert is None else self.home / cert,
            None if key is None else self.home / key,
            "hub.yaml tls_cert/tls_key",
            HUB_MIN_VERSION,
            client_ca=self.home / ca if ca is not None and self.config.mtls == "required" else None,
            at_rest=self.at_rest,
        )


def init_hub(
    home: Path,
    name: str,
    *,
    force: bool = False,
    tls_names: Sequence[str] = DEFAULT_NAMES,
    mtls: bool = False,
    at_rest_key: AtRestKey | None = None,
) -> tuple[HubPaths, str]:
    """Create a hub home with its consortium CA and a hub certificate for `tls_names`
    (encrypted at rest under `at_rest_key` when one is given); return it and the admin token
    (shown once, stored only hashed)."""
    if (home / HUB_CONFIG).exists() and not force:
        raise NodeExistsError(f"a hub already exists at {home}; use --force to start over")
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)
    at_rest = PLAIN if at_rest_key is None else AtRest(at_rest_key)
    create_consortium_tls(home, name, tls_names, at_rest=at_rest)
    config = HubConfig(
        name=name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        tls_cert=TLS_CERT,
        tls_key=TLS_KEY,
        tls_ca=CA_CERT,
        mtls="required" if mtls else "off",
        at_rest=None if at_rest_key is None else AtRestConfig(key_id=at_rest_key.key_id),
    )
    save_hub_config(home, config)
    paths = HubPaths(home, config, at_rest)
    Identity.generate().save(paths.identity_key, at_rest=paths.at_rest)
    token = "aipipe-admin." + secrets.token_urlsafe(32)
    store = paths.open_store()
    try:
        store.add_api_token(secret_hash(token), role="admin", name=BOOTSTRAP)  # revocable
    finally:
        store.close()
    return paths, token


def save_hub_config(home: Path, config: HubConfig) -> None:
    text = yaml.safe_dump(config.model_dump(), sort_keys=False)
    write_private(home / HUB_CONFIG, text.encode(), what="hub config")


def load_hub(home: Path, at_rest_key: AtRestKey | None = None) -> HubPaths:
    """The hub at `home`; an encrypted one only with its at-rest key (AtRestKeyError)."""
    config = read_hub_config(home)
    return HubPaths(home, config, home_at_rest(f"hub home {home}", config.at_rest, at_rest_key))


def read_hub_config(home: Path) -> HubConfig:
    path = home / HUB_CONFIG
    if not path.is_file():
        raise NodeNotFoundError(f"no hub at {home}; run: aipipe hub init --home {home}")
    try:
        config = HubConfig.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"{path} is not a valid hub config: {exc}") from exc
    return config


def served_url(paths: HubPaths) -> str:
    """The URL a running `hub serve` wrote, for commands that need one."""
    try:
        info = json.loads(paths.serve_info.read_text())
        return str(info["url"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"the hub at {paths.home} is not serving (no {SERVE_INFO}); start `aipipe hub serve` "
            "or pass --url"
        ) from exc
