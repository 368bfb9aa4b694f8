"""The node home: config, store, keys and audit log of one institution's node.

<home>/node.yaml        settings (NodeConfig)
<home>/store.sqlite     NodeStore
<home>/identity.key     Ed25519 private key, mode 0600
<home>/pseudonym.key    32 random bytes keying patient pseudonyms, mode 0600
<home>/audit.sqlite     hash-chained audit log
<home>/sealing.key      X25519 key that study secrets are sealed to, mode 0600 (SecureVault)
<home>/hub-ca.pem       the consortium CA the enrolment token pinned: the hub is verified against
                        it alone (or, for a token without a pin, the CA given by --hub-ca)
<home>/client-key.pem   TLS client key and certificate (client-cert.pem) the hub signed at
                        enrolment, presented to a hub with mutual TLS (aipipe.node.client_cert)

The home is 0700 and every file in it 0600: the store holds raw FHIR. A home made with an
at-rest key (`node init --at-rest-key-file`) seals every private file (keys, credential, CKKS
contexts, round states, sent contributions) and the store's PHI columns under it
(`aipipe.secure.at_rest`); node.yaml records the key's id, never the key.
"""

from __future__ import annotations

import secrets
import shutil
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from aipipe.audit.anchor import HUB_HEAD_FILE, HeadRecorder
from aipipe.audit.log import AuditLog
from aipipe.errors import ConfigError, NodeExistsError
from aipipe.fhir.smart_key import SmartKey
from aipipe.node import client_cert
from aipipe.node.client import HubClient
from aipipe.node.vault import SecureVault
from aipipe.pki import fingerprint, load_cert
from aipipe.secure.at_rest import PLAIN, AtRest, AtRestConfig, AtRestKey, home_at_rest
from aipipe.secure.identity import Identity
from aipipe.secure.keyfiles import read_private, write_private
from aipipe.secure.rekey import Rotation, reseal_columns, reseal_files, rotate
from aipipe.settings import NODE_CONFIG, NodeConfig, NodePaths, load_node_config, save_node_config
from aipipe.store.node_store import SEALED_COLUMNS, NodeStore
from aipipe.store.sqlite import immediate
from aipipe.tls import client_context
from aipipe.wire import EnrolRequest, EnrolToken
from aipipe.wire.secure import sealing_key_payload

CREDENTIAL = "hub.credential"
HUB_CA = "hub-ca.pem"
# aipipe.privacy.ledger's tables (BUDGET, SITE, LEDGER), named here so `node init` needs no
# torch. The kept frames (FRAMES) are not carried: they are signed by the replaced identity.
_LEDGER_TABLES = ("privacy_budget", "privacy_site", "privacy_ledger")


def init_node(
    home: Path,
    name: str,
    *,
    force: bool = False,
    allow_non_private: bool = False,
    at_rest_key: AtRestKey | None = None,
) -> NodePaths:
    """Create a node home, encrypted at rest under `at_rest_key` when one is given. With
    `force`, an existing node is moved aside, never deleted, and its privacy ledger (ε spent
    per study) is carried into the new store: the patients are the same, so the ε they have
    spent stays spent."""
    backup = None
    if (home / NODE_CONFIG).exists():
        if not force:
            raise NodeExistsError(
                f"a node already exists at {home}; use --force to move it aside and start over"
            )
        backup = _move_aside(home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    home.chmod(0o700)
    config = NodeConfig(
        name=name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        allow_non_private=allow_non_private,
        at_rest=None if at_rest_key is None else AtRestConfig(key_id=at_rest_key.key_id),
    )
    at_rest = PLAIN if at_rest_key is None else AtRest(at_rest_key)
    paths = NodePaths(home, config, at_rest)
    Identity.generate().save(paths.identity_key, at_rest=at_rest)
    SecureVault.create_sealing_key(paths.sealing_key, at_rest=at_rest)
    pseudonym_key = secrets.token_bytes(32)
    write_private(paths.pseudonym_key, pseudonym_key, what="pseudonym key", at_rest=at_rest)
    store = NodeStore.open(paths.store, pseudonym_key, at_rest=at_rest)
    try:
        carried = carry_ledger(backup / paths.store.name, store.conn) if backup else {}
    finally:
        store.close()
    save_node_config(home, config)
    with open_audit(paths) as audit:
        audit.append("node.init", actor=name, resource=f"node/{name}")
        if backup is not None:
            audit.append(
                "node.ledger_carried",
                actor=name,
                resource=f"node/{name}",
                details={"from": backup.name, "studies": carried},
            )
    return paths


def _move_aside(home: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    backup = home / f".replaced-{stamp}"
    suffix = 1
    while backup.exists():
        suffix += 1
        backup = home / f".replaced-{stamp}-{suffix}"
    backup.mkdir(mode=0o700)
    for entry in home.iterdir():
        if entry != backup and not entry.name.startswith(".replaced-"):
            shutil.move(str(entry), backup / entry.name)
    return backup


def carry_ledger(old_store: Path, conn: sqlite3.Connection) -> dict[str, int]:
    """Copy the privacy budgets and ledger rows of a replaced store into `conn`'s store.

    Returns the number of ledger rows carried per study. Copied table by table with the old
    store's own schema, so this needs neither torch nor the accountant."""
    if not old_store.is_file():
        return {}
    conn.execute("ATTACH DATABASE ? AS old", (str(old_store),))
    try:
        with immediate(conn):
            for table in _LEDGER_TABLES:
                row = conn.execute(
                    "SELECT sql FROM old.sqlite_master WHERE type = 'table' AND name = ?",
                    (table,),
                ).fetchone()
                if row is None:
                    continue
                if not _has_table(conn, table):
                    conn.execute(row[0])
                conn.execute(f"INSERT OR REPLACE INTO main.[{table}] SELECT * FROM old.[{table}]")
            if not _has_table(conn, "privacy_ledger"):
                return {}
            counts = conn.execute(
                "SELECT study, COUNT(*) FROM main.privacy_ledger GROUP BY study ORDER BY study"
            ).fetchall()
    finally:
        conn.execute("DETACH DATABASE old")
    return {str(study): int(n) for study, n in counts}


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM main.sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    return found is not None


def enrol(paths: NodePaths, token_text: str) -> str:
    """Register this node's public key with the hub named in the token; return the hub URL."""
    try:
        token = EnrolToken.decode(token_text.strip())
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if token.node != paths.config.name:
        raise ConfigError(
            f"this enrolment token is for node '{token.node}', not '{paths.config.name}'"
        )
    if token.ca_sha256 is not None:
        pin_hub_ca(paths, token.ca_der())
    identity = Identity.load(paths.identity_key, at_rest=paths.at_rest)
    vault = node_vault(paths)
    if not paths.sealing_key.exists():  # a node initialised before sealing keys existed
        SecureVault.create_sealing_key(paths.sealing_key, at_rest=paths.at_rest)
    sealing = vault.sealing_public()
    tls_key = client_cert.pending(token.node)  # the hub signs it into our client certificate
    request = EnrolRequest(
        node=token.node,
        secret=token.secret,
        public_key=identity.public_hex,
        sealing_key=sealing.hex(),
        sealing_signature=identity.sign(sealing_key_payload(token.node, sealing)).hex(),
        client_csr=tls_key.csr,
    )
    with HubClient(
        token.hub_url,
        ca_bundle=hub_ca(paths),
        ca_only=paths.config.hub_ca_pinned,
        on_audit_head=_hub_head(paths),
    ) as client:
        response = client.enrol(request)
    write_private(paths.home / CREDENTIAL, response.credential.encode(), what="hub credential",
                  at_rest=paths.at_rest)  # fmt: skip
    if response.client_cert is None:  # a hub that signs no client certificates
        client_cert.forget(paths.home)
    else:
        client_cert.install(paths.home, token.node, tls_key, response.client_cert, paths.at_rest)
    paths.config.hub_url = token.hub_url
    save_node_config(paths.home, paths.config)
    return token.hub_url


def set_hub_ca(paths: NodePaths, source: Path) -> None:
    """Keep a copy of the CA that signs the hub's certificate (the consortium's own CA) in the
    home: every call to the hub then trusts it on top of the public CAs."""
    client_context(source)  # a ConfigError now for a file that is not a PEM CA bundle
    write_private(paths.home / HUB_CA, source.read_bytes(), what="hub CA")
    paths.config.hub_ca, paths.config.hub_ca_pinned = HUB_CA, False
    save_node_config(paths.home, paths.config)


def pin_hub_ca(paths: NodePaths, ca_der: bytes) -> None:
    """Keep the consortium CA an enrolment token carries (its fingerprint checked by
    `EnrolToken`) as hub-ca.pem: from now on the hub is verified against it alone."""
    ca = load_cert(ca_der, "the CA in the enrolment token")
    write_private(paths.home / HUB_CA, ca.public_bytes(Encoding.PEM), what="hub CA")
    paths.config.hub_ca, paths.config.hub_ca_pinned = HUB_CA, True
    save_node_config(paths.home, paths.config)


def pinned_fingerprint(paths: NodePaths) -> str:
    """SHA-256 of the CA this node pins (hub-ca.pem), to compare with `hub init`'s."""
    path = paths.home / (paths.config.hub_ca or HUB_CA)
    return fingerprint(load_cert(path.read_bytes(), str(path)))


def hub_ca(paths: NodePaths) -> Path | None:
    return None if paths.config.hub_ca is None else paths.home / paths.config.hub_ca


def setup_smart(paths: NodePaths, client_id: str, alg: str) -> dict[str, Any]:
    """Create the SMART client key (mode 0600) and record the client id; return the public JWKS."""
    if alg not in ("ES384", "RS384"):
        raise ConfigError(f"--smart-alg must be ES384 or RS384, got {alg}")
    key = SmartKey.generate("ES384" if alg == "ES384" else "RS384")
    key.save(paths.smart_key, at_rest=paths.at_rest)
    paths.config.smart_client_id = client_id
    save_node_config(paths.home, paths.config)
    return key.public_jwks()


def hub_client(paths: NodePaths) -> HubClient:
    """A client authenticated as this node; the node must be enrolled."""
    if paths.config.hub_url is None:
        raise ConfigError(
            f"node {paths.config.name} is not enrolled with a hub; "
            "run: aipipe node init --home ... --name ... --token <token from the hub>"
        )
    credential = (
        read_private(paths.home / CREDENTIAL, what="hub credential", at_rest=paths.at_rest)
        .decode()
        .strip()
    )
    return HubClient(
        paths.config.hub_url,
        token=credential,
        ca_bundle=hub_ca(paths),
        ca_only=paths.config.hub_ca_pinned,
        on_audit_head=_hub_head(paths),
        client_pair=client_cert.load_pair(paths.home, paths.at_rest),
    )


def renew_client_cert(paths: NodePaths) -> x509.Certificate:
    """A new TLS client key and certificate from the hub, asked for over a connection that
    presents the current ones (`aipipe node tls renew`)."""
    client_cert.current(paths.home, paths.at_rest)  # none: it must re-enrol; say so first
    request = client_cert.pending(paths.config.name)
    with hub_client(paths) as client:
        answer = client.renew_certificate(request.csr)
    return client_cert.install(paths.home, paths.config.name, request, answer, paths.at_rest)


def _hub_head(paths: NodePaths) -> Callable[[str], None]:
    """Keep the highest signed audit head the hub has shown this node, in the node home."""
    return HeadRecorder(paths.home / HUB_HEAD_FILE).observe


def node_vault(paths: NodePaths) -> SecureVault:
    return SecureVault(paths.sealing_key, paths.secure_dir, at_rest=paths.at_rest)


def open_audit(paths: NodePaths) -> AuditLog:
    identity = Identity.load(paths.identity_key, at_rest=paths.at_rest)
    return AuditLog.open(paths.audit_log, identity, owner=f"node/{paths.config.name}")


def open_store(paths: NodePaths) -> NodeStore:
    key = read_private(paths.pseudonym_key, what="pseudonym key", at_rest=paths.at_rest)
    return NodeStore.open(paths.store, key, at_rest=paths.at_rest)


def open_node(home: Path, at_rest_key: AtRestKey | None = None) -> NodePaths:
    """The node at `home`; an encrypted one only with its at-rest key (AtRestKeyError)."""
    paths = load_node_config(home)
    paths.at_rest = home_at_rest(f"node home {home}", paths.config.at_rest, at_rest_key)
    return paths


def rekey_node(home: Path, old: AtRestKey, new: AtRestKey) -> Rotation:
    """Seal the node home at `home` again under `new` (its files and its store's sealed
    columns; `aipipe.secure.rekey`), audited as node.rekey. Stop the node's daemons first."""
    paths = load_node_config(home)

    def save(setting: AtRestConfig) -> None:
        paths.config.at_rest = setting
        save_node_config(home, paths.config)

    def reseal(at_rest: AtRest, skipped: list[Path]) -> tuple[int, int]:
        paths.at_rest = at_rest
        files = reseal_files(home, at_rest, skipped)
        store = open_store(paths)
        try:
            return files, reseal_columns(store.conn, SEALED_COLUMNS, at_rest)
        finally:
            store.close()

    done = rotate(f"node home {home}", paths.config.at_rest, old, new, save=save, reseal=reseal)
    paths.at_rest = AtRest(new)
    with open_audit(paths) as audit:
        audit.append("node.rekey", actor=paths.config.name, resource=f"node/{paths.config.name}",
                     details={"from": done.old_key_id, "to": done.new_key_id, "files": done.files,
                              "rows": done.rows, "skipped": len(done.skipped)})  # fmt: skip
    return done
