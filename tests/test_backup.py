"""Issue 15, backup and restore: `aipipe node|hub backup|restore` (aipipe.backup, cli.backup).

Real homes: a node with ingested FHIR data, a study approved from a real hub app served
in-process, a privacy ledger row and audit events; a hub with enrolled nodes and a model version.
Each is backed up through the CLI, restored into a fresh path and checked there.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import sqlite3
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from aipipe.audit.events import AuditEvent
from aipipe.audit.log import AuditLog
from aipipe.node.client import HubClient
from aipipe.node.home import init_node
from aipipe.node.node import Node
from aipipe.secure.identity import Identity
from aipipe.store.hub_store import HubStore
from aipipe.study.spec import load_study
from tests.cli_support import assert_user_error, invoke
from tests.hub_support import running_hub

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart-disease"
SITE = EXAMPLE / "fhir" / "switzerland"
STUDY_FILE = EXAMPLE / "study.yaml"
KEYS = ("identity.key", "pseudonym.key", "sealing.key", "hub.credential")
LEDGER_TABLES = ("privacy_budget", "privacy_site", "privacy_ledger", "approvals")


def events(home: Path, action: str) -> list[AuditEvent]:
    with AuditLog.open(home / "audit.sqlite", None) as log:
        return [e for e in log.events() if e.action == action]


def rows(db: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return sorted(conn.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def node_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node after ingest, a study approval (with its ε budget) from a real hub, and a charge."""
    root = tmp_path_factory.mktemp("backup")
    home = root / "node"
    init_node(home, "basel")
    spec = load_study(STUDY_FILE)
    with running_hub(root / "hub") as hub:
        hub.publish(spec.model_dump(mode="json"))
        enrolled = hub.enrol("basel")
        (home / "hub.credential").write_text(enrolled.credential)
        (home / "hub.credential").chmod(0o600)
        client = HubClient("http://testserver", token=enrolled.credential,
                           transport=hub.client._transport)  # fmt: skip
        with Node.open(home, hub=client) as node:
            node.ingest_files([SITE])
            node.approve(spec.name, epsilon=1.0)
            from aipipe.privacy import BudgetLedger

            BudgetLedger(node.store.db).charge(
                spec.name, 1, noise_multiplier=3.0, sample_rate=0.01, steps=5
            )
    return home


def backup(kind: str, home: Path, out: Path) -> dict[str, Any]:
    result = invoke(kind, "backup", "--home", home, "--out", out, "--json")
    assert result.exit_code == 0, result.output
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def restore(kind: str, home: Path, archive: Path, *extra: str) -> dict[str, Any]:
    result = invoke(kind, "restore", "--home", home, "--from", archive, "--json", *extra)
    assert result.exit_code == 0, result.output
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def test_a_restored_node_keeps_its_identity_data_ledger_and_audit_chain(
    node_home: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "node.tar.gz"
    made = backup("node", node_home, archive)
    restored = tmp_path / "restored"
    restore("node", restored, archive)

    verified = invoke("audit", "verify", "--home", restored, "--json")
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.stdout)
    assert report["pinned"] is True and report["events"] >= 5
    old = Identity.load(node_home / "identity.key").public_hex
    assert Identity.load(restored / "identity.key").public_hex == old
    for table in ("resources", *LEDGER_TABLES):
        assert rows(restored / "store.sqlite", table) == rows(node_home / "store.sqlite", table)
    assert rows(restored / "store.sqlite", "privacy_ledger")  # the charge is there
    assert rows(restored / "store.sqlite", "resources")
    for key in KEYS:
        assert stat.S_IMODE((restored / key).stat().st_mode) == 0o600, key
    assert stat.S_IMODE(restored.stat().st_mode) == 0o700
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600  # it holds the keys
    spec_name = load_study(STUDY_FILE).name
    with Node.open(restored) as node:
        assert node.name == "basel" and node.store.approval(spec_name) is not None
    # audited on both sides: the archive's digest in the source, the restore in the copy
    [made_event] = events(node_home, "backup.create")[-1:]
    assert made_event.details["archive_sha256"] == made["sha256"]
    [restored_event] = events(restored, "backup.restore")
    assert restored_event.details["archive_sha256"] == made["sha256"]


def test_a_database_written_by_a_running_process_is_captured_whole(
    node_home: Path, tmp_path: Path
) -> None:
    """Committed rows that live only in the WAL (a daemon's open connection, no checkpoint) are
    in the backup; a plain copy of the main file would lose them."""
    home = tmp_path / "live"
    shutil.copytree(node_home, home)
    live = sqlite3.connect(home / "store.sqlite")
    live.execute("PRAGMA wal_autocheckpoint = 0")
    live.execute("CREATE TABLE probe (n INTEGER)")
    live.executemany("INSERT INTO probe VALUES (?)", [(n,) for n in range(50)])
    live.commit()
    try:
        plain = tmp_path / "plain.sqlite"
        shutil.copy(home / "store.sqlite", plain)
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            rows(plain, "probe")
        archive = tmp_path / "live.tar.gz"
        backup("node", home, archive)
    finally:
        live.close()
    restored = tmp_path / "restored"
    restore("node", restored, archive)
    assert len(rows(restored / "store.sqlite", "probe")) == 50
    with tarfile.open(archive) as tar:
        assert not [n for n in tar.getnames() if n.endswith(("-wal", "-shm"))]


def _tampered(archive: Path, out: Path, victim: str) -> None:
    """The same archive, manifest unchanged, with one byte of `victim` flipped."""
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == f"home/{victim}":
                data = bytes([data[0] ^ 1]) + data[1:]
            dst.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("victim", ["identity.key", "audit.sqlite"])
def test_a_tampered_archive_is_refused_and_writes_nothing(
    node_home: Path, tmp_path: Path, victim: str
) -> None:
    archive, bad = tmp_path / "node.tar.gz", tmp_path / "bad.tar.gz"
    backup("node", node_home, archive)
    _tampered(archive, bad, victim)
    target = tmp_path / "restored"

    result = invoke("node", "restore", "--home", target, "--from", bad)

    line = assert_user_error(result, 6)
    assert "damaged or was altered" in line and victim in line
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if ".restore-" in p.name]  # no staging left


def test_an_archive_with_an_unlisted_file_is_refused(node_home: Path, tmp_path: Path) -> None:
    archive, bad = tmp_path / "node.tar.gz", tmp_path / "bad.tar.gz"
    backup("node", node_home, archive)
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        extra = tarfile.TarInfo("home/authorized_keys")
        extra.size = 3
        dst.addfile(extra, io.BytesIO(b"abc"))

    result = invoke("node", "restore", "--home", tmp_path / "r", "--from", bad)

    assert "does not list" in assert_user_error(result, 6)


def test_an_archive_naming_a_path_outside_the_home_is_refused(tmp_path: Path) -> None:
    data = b"ssh-ed25519 AAAA attacker"
    manifest = {
        "format": "aipipe-backup/1",
        "kind": "node",
        "files": [{"path": "../evil", "mode": "600", "size": len(data),
                   "sha256": hashlib.sha256(data).hexdigest(), "sqlite": False}],
    }  # fmt: skip
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name, body in (
            ("MANIFEST.json", json.dumps(manifest).encode()),
            ("home/../evil", data),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    target = tmp_path / "deep" / "home"

    result = invoke("node", "restore", "--home", target, "--from", bad)

    assert "unsafe path" in assert_user_error(result, 6)
    assert not (tmp_path / "deep" / "evil").exists() and not target.exists()


def test_a_truncated_archive_is_refused(node_home: Path, tmp_path: Path) -> None:
    archive = tmp_path / "node.tar.gz"
    backup("node", node_home, archive)
    data = gzip.decompress(archive.read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(data[: len(data) // 2]))

    result = invoke("node", "restore", "--home", tmp_path / "r", "--from", tmp_path / "cut.tar.gz")

    assert "damaged or was altered" in assert_user_error(result, 6)
    assert not (tmp_path / "r").exists()


def test_restore_over_a_non_empty_home_needs_force_and_moves_it_aside(
    node_home: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "node.tar.gz"
    backup("node", node_home, archive)
    target = tmp_path / "target"
    target.mkdir()
    (target / "something").write_text("kept")

    refused = invoke("node", "restore", "--home", target, "--from", archive)
    assert "--force" in assert_user_error(refused, 2)
    assert sorted(p.name for p in target.iterdir()) == ["something"]

    info = restore("node", target, archive, "--force")
    aside = Path(info["moved_aside"])
    assert (aside / "something").read_text() == "kept"
    assert (target / "node.yaml").is_file()


def test_a_node_archive_is_not_restored_as_a_hub(node_home: Path, tmp_path: Path) -> None:
    archive = tmp_path / "node.tar.gz"
    backup("node", node_home, archive)

    result = invoke("hub", "restore", "--home", tmp_path / "h", "--from", archive)

    assert "aipipe node restore" in assert_user_error(result, 2)
    assert not (tmp_path / "h").exists()


def test_a_restored_hub_keeps_its_nodes_model_versions_and_blobs(tmp_path: Path) -> None:
    spec = load_study(STUDY_FILE)
    with running_hub(tmp_path / "hub") as hub:
        hub.publish(spec.model_dump(mode="json"))
        hub.enrol("basel")
        hub.enrol("cleveland")
        archive = tmp_path / "hub.tar.gz"
        backup("hub", hub.paths.home, archive)  # while the app holds its store open
    home = tmp_path / "hub"
    restored = tmp_path / "hub-restored"

    restore("hub", restored, archive)

    assert invoke("audit", "verify", "--home", restored).exit_code == 0
    nodes = invoke("hub", "nodes", "--home", restored, "--json")
    assert {n["name"] for n in json.loads(nodes.stdout)} == {"basel", "cleveland"}
    old, new = HubStore.open(home / "hub.sqlite", home / "blobs"), None
    try:
        new = HubStore.open(restored / "hub.sqlite", restored / "blobs")
        versions = [dict(row) for row in old.models(spec.name)]
        assert versions and [dict(row) for row in new.models(spec.name)] == versions
        for version in versions:
            assert new.blob(version["blob"]) == old.blob(version["blob"])
    finally:
        old.close()
        if new is not None:
            new.close()
    assert stat.S_IMODE((restored / "identity.key").stat().st_mode) == 0o600
    assert events(restored, "backup.restore") and events(home, "backup.create")


def test_backup_of_a_path_that_is_no_home_says_so(tmp_path: Path) -> None:
    result = invoke("node", "backup", "--home", tmp_path, "--out", tmp_path / "x.tar.gz")

    assert "node init" in assert_user_error(result, 2)
