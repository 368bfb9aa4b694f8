"""The node home: config, store, keys and audit log of one institution's node.

<home>/node.yaml        settings (NodeConfig)
<home>/store.sqlite     NodeStore
<home>/identity.key     Ed25519 private key, mode 0600
<home>/pseudonym.key    32 random bytes keying patient pseudonyms, mode 0600
<home>/audit.sqlite     hash-chained audit log
"""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import UTC, datetime
from pathlib import Path

from aipipe.errors import IdentityError, NodeExistsError
from aipipe.secure.identity import Identity
from aipipe.settings import NODE_CONFIG, NodeConfig, NodePaths, load_node_config, save_node_config
from aipipe.store.node_store import NodeStore

_KEY_MODE = 0o600


def init_node(home: Path, name: str, *, force: bool = False) -> NodePaths:
    """Create a node home. With `force`, an existing node is moved aside, never deleted."""
    if (home / NODE_CONFIG).exists():
        if not force:
            raise NodeExistsError(
                f"a node already exists at {home}; use --force to move it aside and start over"
            )
        _move_aside(home)
    home.mkdir(parents=True, exist_ok=True)
    config = NodeConfig(name=name, created=datetime.now(UTC).isoformat(timespec="seconds"))
    paths = NodePaths(home, config)
    Identity.generate().save(paths.identity_key)
    _write_secret(paths.pseudonym_key, secrets.token_bytes(32))
    NodeStore.open(paths.store, b"").close()
    save_node_config(home, config)
    return paths


def _move_aside(home: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    backup = home / f".replaced-{stamp}"
    backup.mkdir()
    for entry in home.iterdir():
        if entry != backup and not entry.name.startswith(".replaced-"):
            shutil.move(str(entry), backup / entry.name)
    return backup


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _KEY_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def open_store(paths: NodePaths) -> NodeStore:
    try:
        key = paths.pseudonym_key.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read pseudonym key {paths.pseudonym_key}") from exc
    return NodeStore.open(paths.store, key)


def open_node(home: Path) -> NodePaths:
    return load_node_config(home)
