"""Issue 9, item 4: audit logs rewritten, wiped, recreated or truncated must fail `verify`.

Each test is a tampering case the old `verify` passed: the log must keep the checkpoint cadence
it promises (a signed ``audit.policy`` event), every process signs its head when it closes, and
a signed head kept outside the file (an export's anchor, the hub's response header that nodes
keep) catches what is deleted together with its checkpoints.
"""

from __future__ import annotations

import json
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aipipe.audit import AuditLog, verify
from aipipe.cli.audit import app
from aipipe.errors import AuditChainBrokenError, StoreError
from aipipe.secure.identity import Identity
from tests.audit_support import _broken, _documented_hash, _fill, _rows, _tamper


def _rehash_from(path: Path, seq: int, details: str) -> list[tuple[str, list[Any]]]:
    """Statements that rewrite event `seq`'s details and recompute every hash after it."""
    rows = _rows(path)
    statements: list[tuple[str, list[Any]]] = []
    for row in rows[seq - 1 :]:
        if row["seq"] == seq:
            row["details"] = details
        row["prev_hash"] = rows[row["seq"] - 2]["hash"] if row["seq"] > 1 else "0" * 64
        row["hash"] = _documented_hash(row)
        statements.append(
            (
                "UPDATE events SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                [row["details"], row["prev_hash"], row["hash"], row["seq"]],
            )
        )
    return statements


def _wipe(path: Path) -> None:
    """Zero the file (and its WAL) as someone with write access to the home would."""
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        target = path.with_name(name)
        if target.exists():
            target.write_bytes(b"")


def _head_anchor(path: Path, owner: Identity) -> Any:
    from aipipe.audit import Anchor

    with AuditLog.open(path, owner, checkpoint_every=10) as log:
        signed = log.checkpoint()
    assert signed is not None
    return Anchor.from_checkpoint(signed)


# --- checkpoints deleted ---------------------------------------------------------------------


def test_an_edit_rehashed_with_every_checkpoint_deleted_is_caught(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 30, every=10)
    _tamper(
        log_path, *_rehash_from(log_path, 13, '{"round":1300}'), ("DELETE FROM checkpoints", [])
    )

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "no signed checkpoint at event 1" in str(error)
    assert error.first_bad_seq == 1


def test_deleting_only_the_checkpoint_rows_is_caught(log_path: Path, owner: Identity) -> None:
    _fill(log_path, owner, 30, every=10)
    _tamper(log_path, ("DELETE FROM checkpoints WHERE seq > 1", []))

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "no signed checkpoint at event 10" in str(error)
    assert "every 10 events" in str(error)


def test_a_promised_cadence_raised_and_rehashed_is_caught(log_path: Path, owner: Identity) -> None:
    _fill(log_path, owner, 30, every=10)
    policy = json.loads(_rows(log_path)[0]["details"])
    loose = json.dumps({**policy, "checkpoint_every": 1000}, sort_keys=True, separators=(",", ":"))
    _tamper(
        log_path, *_rehash_from(log_path, 1, loose), ("DELETE FROM checkpoints WHERE seq > 1", [])
    )

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "checkpoint at event 1 signed a different hash" in str(error)


def test_events_past_the_cadence_without_a_checkpoint_fail(log_path: Path, owner: Identity) -> None:
    _fill(log_path, owner, 3, every=10)
    with AuditLog.open(log_path, None) as unsigned:  # a writer without the owner's key
        for _ in range(10):
            unsigned.append("admin", actor="user:mallory")

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "no signed checkpoint at event 10" in str(error)


# --- wiped or recreated ----------------------------------------------------------------------


def test_deleting_every_event_and_checkpoint_is_caught(log_path: Path, owner: Identity) -> None:
    _fill(log_path, owner, 25, every=10)
    _tamper(log_path, ("DELETE FROM events", []), ("DELETE FROM checkpoints", []))

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "the log is empty" in str(error)


def test_a_file_zeroed_and_recreated_without_the_key_is_caught(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 25, every=10)
    _wipe(log_path)
    with AuditLog.open(log_path, None, owner="st-olav") as forged:
        for number in range(5):
            forged.append("train", actor="node:st-olav", details={"round": number})

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "no signed audit policy" in str(error)


def test_a_file_recreated_with_another_key_fails_when_the_owner_is_pinned(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 25, every=10)
    _wipe(log_path)
    _fill(log_path, Identity.generate(), 5)  # fewer events than the cadence

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "not by the log owner's key" in str(error)


def test_a_log_recreated_and_re_signed_with_a_new_key_fails_against_an_anchor(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 25, every=10)
    anchor = _head_anchor(log_path, owner)
    _wipe(log_path)
    intruder = Identity.generate()
    _fill(log_path, intruder, 40, every=10)  # longer than the anchored log, fully signed

    assert verify(log_path, trusted_keys=[intruder.public_bytes]).events == 41
    with_anchor = _broken(log_path, anchor=anchor)
    assert f"event {anchor.seq} is not the event the outside anchor signed" in str(with_anchor)
    pinned = _broken(log_path, trusted_keys=[intruder.public_bytes], anchor=anchor)
    assert "the owner's key was replaced" in str(pinned)


# --- the tail --------------------------------------------------------------------------------


def test_a_tail_truncated_after_the_last_cadence_checkpoint_is_caught(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 25, every=10)  # 26 events; closing the log signs event 26
    _tamper(log_path, ("DELETE FROM events WHERE seq > 20", []))

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert error.first_bad_seq == 21
    assert "deleted from the end" in str(error)


def test_a_trailing_event_rewritten_after_the_last_cadence_checkpoint_is_caught(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 25, every=10)
    _tamper(log_path, *_rehash_from(log_path, 24, '{"round":2400}'))

    error = _broken(log_path, trusted_keys=[owner.public_bytes])

    assert "checkpoint at event 26 signed a different hash" in str(error)


def test_a_tail_truncated_with_its_checkpoints_is_caught_by_an_anchor(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 25, every=10)
    anchor = _head_anchor(log_path, owner)
    _tamper(
        log_path,
        ("DELETE FROM events WHERE seq > 20", []),
        ("DELETE FROM checkpoints WHERE seq > 20", []),
    )

    error = _broken(log_path, trusted_keys=[owner.public_bytes], anchor=anchor)

    assert error.first_bad_seq == 21
    assert "the outside anchor was signed at event 26" in str(error)


def test_a_log_rolled_back_to_an_older_copy_is_caught_by_an_anchor(
    log_path: Path, owner: Identity, tmp_path: Path
) -> None:
    _fill(log_path, owner, 12, every=10)
    backup = tmp_path / "backup.sqlite"
    shutil.copy2(log_path, backup)
    _fill(log_path, owner, 12, every=10)
    anchor = _head_anchor(log_path, owner)
    shutil.copy2(backup, log_path)

    assert verify(log_path, trusted_keys=[owner.public_bytes]).events == 13
    error = _broken(log_path, trusted_keys=[owner.public_bytes], anchor=anchor)
    assert f"the outside anchor was signed at event {anchor.seq}" in str(error)


def test_events_forged_after_the_final_checkpoint_fail_strict_verification(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 25, every=10)
    with AuditLog.open(log_path, None) as forged:
        for _ in range(3):
            forged.append("admin", actor="user:mallory")

    assert verify(log_path, trusted_keys=[owner.public_bytes]).unanchored == 3
    error = _broken(log_path, trusted_keys=[owner.public_bytes], strict=True)
    assert error.first_bad_seq == 27
    assert "events 27–29 come after the last signed checkpoint" in str(error)


# --- the command line ------------------------------------------------------------------------


def test_cli_export_writes_an_anchor_that_verify_holds_the_log_to(
    tmp_path: Path, owner: Identity
) -> None:
    home = tmp_path / "hub"
    home.mkdir()
    owner.save(home / "identity.key")
    _fill(home / "audit.sqlite", owner, 30)
    out = tmp_path / "audit.jsonl"
    runner = CliRunner()

    exported = runner.invoke(
        app, ["export", "--home", str(home), "--format", "jsonl", "--out", str(out), "--json"]
    )
    anchor_file = Path(json.loads(exported.stdout)["anchor_file"])
    intact = runner.invoke(app, ["verify", "--home", str(home), "--anchor", str(anchor_file)])
    strict = ["--strict", "--anchor", str(anchor_file)]
    of_export = runner.invoke(app, ["verify", "--jsonl", str(out), *strict])
    _wipe(home / "audit.sqlite")
    _fill(home / "audit.sqlite", owner, 40)  # even re-signed with the owner's own key
    wiped = runner.invoke(app, ["verify", "--home", str(home), "--anchor", str(anchor_file)])

    assert exported.exit_code == 0, exported.output
    assert anchor_file.read_text().startswith("32.")  # policy, 30 events, CLI policy: 32
    assert intact.exit_code == 0, intact.output
    assert "anchored at  event 32" in intact.output
    assert of_export.exit_code == 0, of_export.output
    assert wiped.exit_code == AuditChainBrokenError.exit_code
    assert "event 32 is not the event the outside anchor signed" in wiped.output


def test_cli_refuses_an_anchor_whose_signature_does_not_verify(
    tmp_path: Path, owner: Identity
) -> None:
    log_path = tmp_path / "audit.sqlite"
    _fill(log_path, owner, 5)
    anchor = _head_anchor(log_path, owner)
    forged = anchor.compact().replace(anchor.hash, "0" * 64)
    home = tmp_path
    owner.save(home / "identity.key")

    result = CliRunner().invoke(app, ["verify", "--home", str(home), "--anchor", forged])

    assert result.exit_code != 0
    assert "signature that does not verify" in result.output


def test_a_database_file_that_is_zeroed_is_not_an_audit_log(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 5)
    _wipe(log_path)

    with pytest.raises(StoreError, match="not an aipipe audit log"):
        verify(log_path)


# --- the hub and its nodes -------------------------------------------------------------------


def test_a_hub_stopped_in_process_leaves_a_checkpoint_at_its_head(tmp_path: Path) -> None:
    from tests.hub_support import running_hub

    with running_hub(tmp_path / "hub") as hub:
        hub.enrol("site-a")
        hub.publish()
        paths = hub.paths

    with AuditLog.open(paths.audit_log, None) as log:
        head, checkpoints = log.head(), log.checkpoints()
    assert head is not None and checkpoints
    assert (checkpoints[-1].seq, checkpoints[-1].hash) == (head.seq, head.hash)
    identity = Identity.load(paths.identity_key)
    assert verify(paths.audit_log, trusted_keys=[identity.public_bytes]).events == head.seq


def test_every_hub_response_carries_its_signed_audit_head(tmp_path: Path) -> None:
    from aipipe.audit import HEADER, Anchor
    from tests.hub_support import running_hub

    with running_hub(tmp_path / "hub") as hub:
        healthz = hub.client.get("/healthz")
        refused = hub.client.get("/v1/work")  # no token: 401, with the head all the same
        identity = Identity.load(hub.paths.identity_key)

    heads = [Anchor.parse(response.headers[HEADER]) for response in (healthz, refused)]
    assert refused.status_code == 401
    assert {head.public_key for head in heads} == {identity.public_hex}
    with AuditLog.open(hub.paths.audit_log, None) as log:
        stored = {(c.seq, c.hash) for c in log.checkpoints()}
    assert {(head.seq, head.hash) for head in heads} <= stored


def _enrol_through_the_cli(hub_home: Path, node_home: Path, name: str) -> None:
    from tests.e2e_support import aipipe_in_process

    issued = aipipe_in_process("hub", "enrol-token", "--home", hub_home, "--node", name, "--json")
    token = json.loads(issued.stdout)["token"]
    aipipe_in_process("node", "init", "--home", node_home, "--name", name, "--token", token)


def _copy_home(hub_home: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("identity.key", "audit.sqlite"):
        shutil.copy2(hub_home / name, to / name)
    return to


@pytest.mark.e2e
def test_a_hub_log_cut_or_wiped_after_a_node_saw_its_head_fails_against_the_nodes_copy(
    tmp_path: Path,
) -> None:
    from tests.e2e_support import ProcessGroup, aipipe, aipipe_in_process, start_hub

    hub_home = tmp_path / "hub"
    aipipe_in_process("hub", "init", "--home", hub_home, "--json")
    group = ProcessGroup(tmp_path / "logs")
    try:
        for name in ("site-a", "site-b"):  # site-b enrols with a hub restarted after site-a
            hub = start_hub(group, hub_home)
            _enrol_through_the_cli(hub_home, tmp_path / name, name)
            hub.process.send(signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
            assert hub.process.wait() in (0, -signal.SIGTERM), hub.process.log_tail()
    finally:
        group.stop()
    kept = tmp_path / "site-b" / "hub-audit-head"
    seen = int(kept.read_text().split(".")[0])
    cut = _copy_home(hub_home, tmp_path / "cut")
    _tamper(
        cut / "audit.sqlite",
        ("DELETE FROM events WHERE seq >= ?", [seen]),
        ("DELETE FROM checkpoints WHERE seq >= ?", [seen]),
    )
    wiped = _copy_home(hub_home, tmp_path / "wiped")
    _wipe(wiped / "audit.sqlite")
    _fill(wiped / "audit.sqlite", Identity.load(wiped / "identity.key"), 2 * seen)

    with ThreadPoolExecutor(max_workers=3) as pool:  # three homes of their own: side by side
        verifying = pool.submit(
            aipipe, "audit", "verify", "--home", hub_home, "--strict", "--anchor", kept
        )
        checks = {
            home.name: pool.submit(
                aipipe, "audit", "verify", "--home", home, "--anchor", kept, check=False
            )
            for home in (cut, wiped)
        }
        intact = verifying.result()
        results = {name: check.result() for name, check in checks.items()}

    assert seen > 1  # the first run's final checkpoint, signed at shutdown
    assert "anchored at  event" in intact.stdout
    assert {name: r.returncode for name, r in results.items()} == {
        "cut": AuditChainBrokenError.exit_code,
        "wiped": AuditChainBrokenError.exit_code,
    }
    assert f"the outside anchor was signed at event {seen}" in results["cut"].stderr
    assert f"event {seen} is not the event the outside anchor signed" in results["wiped"].stderr
