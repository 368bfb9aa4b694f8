"""The audit log: hash chain, signed checkpoints, tamper detection, exports and the CLI."""

from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aipipe.audit import (
    GENESIS_HASH,
    Action,
    AuditLog,
    Outcome,
    export,
    verify,
    verify_jsonl,
)
from aipipe.cli.audit import app
from aipipe.errors import AuditChainBrokenError, IdentityError
from aipipe.secure.identity import Identity
from aipipe.settings import NodeConfig, save_node_config
from tests.audit_support import _broken, _documented_hash, _fill, _rows, _tamper

# --- appending -----------------------------------------------------------------------------


def test_events_link_to_the_previous_hash_from_a_zero_genesis(log_path: Path) -> None:
    with AuditLog.open(log_path, None) as log:
        first = log.append("ingest", actor="node:a", details={"resources": 12})
        second = log.append(Action.FEATURES_EXTRACT, actor="node:a", resource="study:chd")
        stored, head = list(log.events()), log.head()

    assert (first.seq, first.prev_hash) == (1, GENESIS_HASH)
    assert (second.seq, second.prev_hash) == (2, first.hash)
    assert (stored, head) == ([first, second], second)


def test_stored_rows_follow_the_documented_schema_and_hash_rule(log_path: Path) -> None:
    with AuditLog.open(log_path, None) as log:
        log.append(
            Action.UPDATE_REFUSED,
            actor="hub",
            resource="round:7",
            outcome=Outcome.REFUSED,
            details={"node": "node:b", "reason": "late", "ε": 0.2},
        )

    (row,) = _rows(log_path)
    assert list(row) == [
        "seq",
        "time",
        "actor",
        "action",
        "resource",
        "outcome",
        "details",
        "prev_hash",
        "hash",
    ]
    assert row["time"].endswith("Z")
    assert row["details"] == '{"node":"node:b","reason":"late","ε":0.2}'
    assert row["outcome"] == "refused"
    assert row["hash"] == _documented_hash(row)


@pytest.mark.parametrize(
    ("field", "value", "exception"),
    [
        ("action", "Not An Action", ValueError),
        ("outcome", "maybe", ValueError),
        ("details", {"score": float("nan")}, ValueError),
        ("details", {"when": object()}, TypeError),
    ],
)
def test_malformed_events_are_refused_before_they_reach_the_chain(
    log_path: Path, field: str, value: Any, exception: type[Exception]
) -> None:
    event: dict[str, Any] = {"action": "admin", "outcome": "success", "details": None}
    event[field] = value
    with AuditLog.open(log_path, None) as log, pytest.raises(exception):
        log.append(event.pop("action"), actor="user:alice", **event)

    assert verify(log_path, allow_unsigned=True).events == 0


def test_the_table_refuses_updates_and_deletes(log_path: Path) -> None:
    _fill(log_path, None, 3)
    conn = sqlite3.connect(log_path)

    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET actor = 'x' WHERE seq = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events WHERE seq = 3")
    conn.close()


def test_a_checkpoint_is_signed_every_n_events_and_on_request(
    log_path: Path, owner: Identity
) -> None:
    with AuditLog.open(log_path, owner, checkpoint_every=10) as log:
        for _ in range(25):
            log.append(Action.ADMIN, actor="user:alice")
        explicit = log.checkpoint()
        checkpoints = log.checkpoints()

    assert [c.seq for c in checkpoints] == [1, 10, 20, 26]  # 1: the signed cadence policy
    assert explicit == checkpoints[-1]
    assert {c.public_key for c in checkpoints} == {owner.public_hex}


def test_a_log_without_identity_cannot_sign_a_checkpoint(log_path: Path) -> None:
    _fill(log_path, None, 12)

    with AuditLog.open(log_path, None) as log:
        assert log.checkpoints() == []
        with pytest.raises(IdentityError, match="without an identity key"):
            log.checkpoint()


def _append_from_another_process(path: str, actor: str, count: int, start: Any) -> None:
    with AuditLog.open(Path(path), None, checkpoint_every=25) as log:
        start.wait(60)  # both processes are up and hold the log open: now race
        for number in range(count):
            log.append(Action.INGEST, actor=actor, details={"batch": number})
            time.sleep(0.001)  # a daemon's pace, not a tight loop that starves the other writer


def test_two_processes_appending_at_once_keep_one_valid_chain(log_path: Path) -> None:
    AuditLog.open(log_path, None).close()
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    workers = [
        context.Process(
            target=_append_from_another_process, args=(str(log_path), actor, 300, start)
        )
        for actor in ("node:a", "node:b")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)

    assert [worker.exitcode for worker in workers] == [0, 0]
    assert verify(log_path, allow_unsigned=True).events == 600
    actors = [row["actor"] for row in _rows(log_path)]
    assert actors.count("node:a") == actors.count("node:b") == 300
    turns = sum(a != b for a, b in itertools.pairwise(actors))
    assert turns > 10, f"the two writers took only {turns} turns: they did not overlap"


# --- verification --------------------------------------------------------------------------


def test_a_long_chain_verifies_with_its_checkpoints(log_path: Path, owner: Identity) -> None:
    _fill(log_path, owner, 250, every=50)

    report = verify(log_path, trusted_keys=[owner.public_bytes])

    rows = _rows(log_path)
    assert report.events == 251  # the policy event, then the 250 appended
    assert report.checkpoints == 7  # at the policy, every 50th event, and at close
    assert (report.checkpoint_every, report.unanchored) == (50, 0)
    assert report.head_hash == rows[-1]["hash"]
    assert (report.first_time, report.last_time) == (rows[0]["time"], rows[-1]["time"])
    assert report.signers == (owner.public_hex,)


def test_an_empty_unsigned_log_verifies_with_the_genesis_head_when_allowed(log_path: Path) -> None:
    AuditLog.open(log_path, None).close()

    report = verify(log_path, allow_unsigned=True)

    assert (report.events, report.head_hash, report.first_time) == (0, GENESIS_HASH, None)


def test_editing_an_events_details_names_that_event(log_path: Path) -> None:
    _fill(log_path, None, 12)
    _tamper(log_path, ("UPDATE events SET details = ? WHERE seq = 7", ['{"round":700}']))

    error = _broken(log_path)

    assert error.first_bad_seq == 7
    assert "event 7 was edited" in str(error)


def test_respelling_details_as_other_json_counts_as_an_edit(log_path: Path) -> None:
    _fill(log_path, None, 5)
    spaced = json.dumps(json.loads(_rows(log_path)[2]["details"]), indent=1)
    _tamper(log_path, ("UPDATE events SET details = ? WHERE seq = 3", [spaced]))

    assert _broken(log_path).first_bad_seq == 3


def test_deleting_a_middle_event_names_the_gap(log_path: Path) -> None:
    _fill(log_path, None, 12)
    _tamper(log_path, ("DELETE FROM events WHERE seq = 5", []))

    error = _broken(log_path)

    assert error.first_bad_seq == 5
    assert "event 5 missing" in str(error)


def test_swapping_two_events_is_detected_at_the_first_of_them(log_path: Path) -> None:
    _fill(log_path, None, 12)
    rows = {row["seq"]: row for row in _rows(log_path)}
    columns = [key for key in rows[3] if key != "seq"]
    assignments = ", ".join(f"{column} = ?" for column in columns)
    _tamper(
        log_path,
        (f"UPDATE events SET {assignments} WHERE seq = 3", [rows[4][c] for c in columns]),
        (f"UPDATE events SET {assignments} WHERE seq = 4", [rows[3][c] for c in columns]),
    )

    error = _broken(log_path)

    assert error.first_bad_seq == 3
    assert "replaced or moved" in str(error)


def test_an_event_rewritten_with_a_recomputed_hash_breaks_the_next_link(log_path: Path) -> None:
    _fill(log_path, None, 12)
    row = _rows(log_path)[5]
    row["details"] = '{"round":600}'
    _tamper(
        log_path,
        (
            "UPDATE events SET details = ?, hash = ? WHERE seq = 6",
            [row["details"], _documented_hash(row)],
        ),
    )

    error = _broken(log_path)

    assert error.first_bad_seq == 7
    assert "does not link to event 6" in str(error)


def test_a_rechained_rewrite_is_caught_by_the_next_checkpoint(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 30, every=10)
    rows = _rows(log_path)
    statements = []
    for row in rows[12:]:  # rewrite event 13 and recompute every hash after it
        if row["seq"] == 13:
            row["details"] = '{"round":1300}'
        row["prev_hash"] = rows[row["seq"] - 2]["hash"]
        row["hash"] = _documented_hash(row)
        statements.append(
            (
                "UPDATE events SET details = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                [row["details"], row["prev_hash"], row["hash"], row["seq"]],
            )
        )
    _tamper(log_path, *statements)

    error = _broken(log_path)

    assert error.first_bad_seq == 11
    assert "checkpoint at event 20" in str(error)


def test_deleting_the_tail_past_a_checkpoint_is_detected(log_path: Path, owner: Identity) -> None:
    _fill(log_path, owner, 25, every=10)
    _tamper(log_path, ("DELETE FROM events WHERE seq > 15", []))

    error = _broken(log_path)

    assert error.first_bad_seq == 16
    assert "deleted from the end" in str(error)


def test_a_forged_checkpoint_signature_is_detected(log_path: Path, owner: Identity) -> None:
    _fill(log_path, owner, 25, every=10)
    _tamper(log_path, ("UPDATE checkpoints SET signature = ? WHERE seq = 20", ["00" * 64]))

    error = _broken(log_path)

    assert error.first_bad_seq == 20
    assert "signature that does not verify" in str(error)


def test_a_checkpoint_re_signed_by_another_key_fails_only_when_the_owner_is_pinned(
    log_path: Path, owner: Identity
) -> None:
    _fill(log_path, owner, 10, every=10)
    intruder = Identity.generate()
    head = _rows(log_path)[9]["hash"]
    signature = intruder.sign(f"aipipe-audit-checkpoint:10:{head}".encode()).hex()
    _tamper(
        log_path,
        (
            "UPDATE checkpoints SET public_key = ?, signature = ? WHERE seq = 10",
            [intruder.public_hex, signature],
        ),
    )

    assert intruder.public_hex in verify(log_path).signers
    error = _broken(log_path, trusted_keys=[owner.public_bytes])
    assert error.first_bad_seq == 10
    assert "not by the log owner's key" in str(error)


# --- exports -------------------------------------------------------------------------------


def test_a_jsonl_export_verifies_without_the_database(
    log_path: Path, owner: Identity, tmp_path: Path
) -> None:
    _fill(log_path, owner, 25, every=10)
    out = tmp_path / "audit.jsonl"

    count = export(log_path, "jsonl", out)

    assert count == 26
    from_export = verify_jsonl(out, trusted_keys=[owner.public_bytes])
    assert from_export == verify(log_path, trusted_keys=[owner.public_bytes])
    assert from_export.checkpoints == 4  # the policy, events 10 and 20, and the close


def test_an_edited_jsonl_line_fails_verification(
    log_path: Path, owner: Identity, tmp_path: Path
) -> None:
    _fill(log_path, owner, 25, every=10)
    out = tmp_path / "audit.jsonl"
    export(log_path, "jsonl", out)
    lines = out.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[8])
    record["details"]["epsilon_spent"] = 0.0
    lines[8] = json.dumps(record)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(AuditChainBrokenError) as caught:
        verify_jsonl(out)

    assert caught.value.first_bad_seq == record["seq"] == 8


def test_a_jsonl_export_cut_before_its_last_checkpoint_fails(
    log_path: Path, owner: Identity, tmp_path: Path
) -> None:
    _fill(log_path, owner, 25, every=10)
    out = tmp_path / "audit.jsonl"
    export(log_path, "jsonl", out)
    lines = out.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if json.loads(line).get("seq", 0) <= 15 or "checkpoint" in line]
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")

    with pytest.raises(AuditChainBrokenError) as caught:
        verify_jsonl(out)

    assert caught.value.first_bad_seq == 16


def test_a_csv_export_holds_the_table_columns_as_stored(log_path: Path, tmp_path: Path) -> None:
    _fill(log_path, None, 4)
    out = tmp_path / "audit.csv"

    count = export(log_path, "csv", out)

    with out.open(newline="", encoding="utf-8") as handle:
        exported = list(csv.DictReader(handle))
    stored = _rows(log_path)
    assert count == len(exported) == 4
    assert [{k: str(v) for k, v in row.items()} for row in stored] == exported


def test_a_fhir_export_is_a_valid_r4_bundle_of_audit_events(log_path: Path, tmp_path: Path) -> None:
    bundle_model = pytest.importorskip("fhirclient.models.bundle")
    audit_model = pytest.importorskip("fhirclient.models.auditevent")
    with AuditLog.open(log_path, None, owner="st-olav") as log:
        log.append(Action.CDS_REQUEST, actor="ehr:epic", resource="patient:7f3a")
        log.append(Action.UPDATE_REFUSED, actor="hub", outcome="refused", details={"n": 1})
        log.append(Action.AUTH_FAILURE, actor="ip:10.0.0.9", outcome="failure")
    out = tmp_path / "audit.fhir.json"

    assert export(log_path, "fhir", out) == 3

    bundle = json.loads(out.read_text(encoding="utf-8"))
    bundle_model.Bundle(bundle, strict=True)
    resources = [entry["resource"] for entry in bundle["entry"]]
    for resource in resources:
        audit_model.AuditEvent(resource, strict=True)
    assert bundle["type"] == "collection"
    assert [r["outcome"] for r in resources] == ["0", "4", "8"]
    assert [r["type"]["code"] for r in resources] == ["rest", "110100", "110100"]
    assert {r["source"]["observer"]["display"] for r in resources} == {"st-olav"}
    details = {d["type"]: d["valueString"] for d in resources[1]["entity"][0]["detail"]}
    assert details["hash"] == _rows(log_path)[1]["hash"]
    assert details["details"] == '{"n":1}'


def test_an_empty_log_exports_a_valid_empty_bundle(log_path: Path, tmp_path: Path) -> None:
    bundle_model = pytest.importorskip("fhirclient.models.bundle")
    AuditLog.open(log_path, None).close()
    out = tmp_path / "empty.json"

    assert export(log_path, "fhir", out) == 0

    bundle = json.loads(out.read_text(encoding="utf-8"))
    bundle_model.Bundle(bundle, strict=True)
    assert "entry" not in bundle


# --- command line --------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, owner: Identity) -> Path:
    home = tmp_path / "hub"
    home.mkdir()
    owner.save(home / "identity.key")
    _fill(home / "audit.sqlite", owner, 12, every=5)
    return home


def test_cli_export_writes_the_file_and_records_the_export(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"

    result = CliRunner().invoke(
        app, ["export", "--home", str(home), "--format", "jsonl", "--out", str(out), "--json"]
    )

    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    # 13 events (policy + 12), then the CLI's own cadence (100, not the fixture's 5) as event 14
    assert printed["events"] == 14
    assert verify_jsonl(out, strict=True).events == 14
    last = _rows(home / "audit.sqlite")[-1]
    assert (last["seq"], last["action"]) == (15, "audit.export")
    assert json.loads(last["details"]) == {
        "anchor_seq": 14,
        "events": 14,
        "file": "audit.jsonl",
        "format": "jsonl",
    }


def test_cli_verify_reports_an_intact_chain(home: Path) -> None:
    result = CliRunner().invoke(app, ["verify", "--home", str(home), "--json"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["valid"], report["events"], report["checkpoints"]) == (True, 13, 4)
    assert report["pinned"] is True


def test_cli_verify_fails_naming_the_first_bad_sequence_number(home: Path) -> None:
    _tamper(home / "audit.sqlite", ("DELETE FROM events WHERE seq = 4", []))

    result = CliRunner().invoke(app, ["verify", "--home", str(home)])

    assert result.exit_code == AuditChainBrokenError.exit_code
    assert "event 4 missing" in result.output
    assert "Traceback" not in result.output


def test_cli_verify_checks_an_exported_jsonl_against_a_given_key(
    home: Path, owner: Identity, tmp_path: Path
) -> None:
    out = tmp_path / "audit.jsonl"
    export(home / "audit.sqlite", "jsonl", out)

    good = CliRunner().invoke(app, ["verify", "--jsonl", str(out), "--key", owner.public_hex])
    other = Identity.generate().public_hex
    bad = CliRunner().invoke(app, ["verify", "--jsonl", str(out), "--key", other])

    assert good.exit_code == 0, good.output
    assert "audit chain intact: 13 events" in good.output
    assert bad.exit_code == AuditChainBrokenError.exit_code
    assert "checkpoint at event 1 " in bad.output


def test_cli_export_of_a_node_home_names_the_node_as_fhir_observer(
    tmp_path: Path, owner: Identity
) -> None:
    home = tmp_path / "node"
    home.mkdir()
    save_node_config(home, NodeConfig(name="haukeland", created="2026-01-01T00:00:00+00:00"))
    owner.save(home / "identity.key")
    _fill(home / "audit.sqlite", owner, 3)
    out = tmp_path / "bundle.json"

    result = CliRunner().invoke(
        app, ["export", "--home", str(home), "--format", "fhir", "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    entries = json.loads(out.read_text(encoding="utf-8"))["entry"]
    assert {e["resource"]["source"]["observer"]["display"] for e in entries} == {"haukeland"}
