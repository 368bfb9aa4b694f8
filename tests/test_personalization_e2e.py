"""A personalized study end to end: a hub and four hospital nodes as real processes on
127.0.0.1, the shipped heart-disease data, an mlp, DP-SGD.

One federation per method (`story`) runs a round of the study in the clear and one under
SecAgg+, restarts a node, and runs a second round in the clear. Each node keeps its local
training state in its own store (`aipipe.node.personal_state`); the tests search every file the
hub wrote (database, WAL, blobs, audit log, process log) for those tensors' bytes, with a control
that finds a planted copy, and check that the restarted node's second round started from the
state its first round left. Methods whose every tensor is shared keep no training state: their
search is skipped (their personal models are another test's).
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aipipe.personalization import PERSONALIZERS
from aipipe.wire.tensors import Arrays, decode_arrays
from tests.e2e_support import Federation, aipipe_in_process, node_audit_events

pytestmark = pytest.mark.e2e

SITES = ("cleveland", "hungarian", "switzerland", "va")
METHODS = [m for m in ("fedper", "fenda", "finetune", "ditto") if m in PERSONALIZERS]
ROUND_S = 120.0
RESTARTED = "hungarian"


@dataclass
class Story:
    fed: Federation
    method: str
    clear: str
    masked: str
    rounds: dict[str, dict[str, Any]]  # "clear-1", "masked-1", "clear-2" → round info


def personal_fields(method: str, secure: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": {"kind": "mlp", "hidden": [8]},
        "personalization": {"method": method},
        "secure": secure,
        # RDP calibrates σ in a second where PRV takes several: the e2e test's time is the
        # nodes' start-up and σ's calibration, not training
        "privacy": {"mode": "dp", "epsilon": 1.0, "delta": 1e-5, "clip": 0.5, "accountant": "rdp"},
    }
    if secure != "none":  # a stage waits for nodes still calibrating σ for the new study
        fields.update(min_nodes=3, secure_options={"stage_timeout_s": 60.0})
    return fields


@pytest.fixture(scope="module", params=METHODS)
def story(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Story]:
    method: str = request.param
    root = tmp_path_factory.mktemp(f"personal-{method}")
    clear, masked = f"{method}-clear", f"{method}-secagg"
    with Federation.running(root, sites=SITES, deadline_s=ROUND_S) as fed:
        fed.publish(clear, deadline_s=ROUND_S, secure=personal_fields(method, "none"))
        fed.publish(masked, deadline_s=ROUND_S, secure=personal_fields(method, "secagg"))
        fed.start_daemons(*SITES, poll_s=0.5)
        rounds: dict[str, dict[str, Any]] = {}
        for key, study, number in (("clear-1", clear, 1), ("masked-1", masked, 1)):
            fed.open_round(study=study)
            rounds[key] = fed.wait_for_round(
                number, "closed", "failed", study=study, timeout_s=ROUND_S
            )
        fed.daemons[RESTARTED].kill()  # between rounds: what it keeps is in its store
        fed.start_daemons(RESTARTED, poll_s=0.5)
        fed.open_round(study=clear)
        rounds["clear-2"] = fed.wait_for_round(
            2, "closed", "failed", study=clear, timeout_s=ROUND_S
        )
        yield Story(fed, method, clear, masked, rounds)


def states(fed: Federation, site: str) -> list[dict[str, Any]]:
    """The node's kept local training states, read from its store without taking a lock."""
    path = fed.nodes[site] / "store.sqlite"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'personal_states'"
        ).fetchone()
        if not exists:
            return []
        rows = conn.execute("SELECT * FROM personal_states ORDER BY study, round").fetchall()
    finally:
        conn.close()
    return [dict(row) for row in rows]


def hub_files(fed: Federation) -> list[tuple[Path, bytes]]:
    """Every file the hub wrote: its home (store, WAL, blobs, audit log) and its process logs."""
    roots = [fed.hub.home] + [p.log for p in fed.group.started if p.name == "hub"]
    files = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*")) if f.is_file()]
    return [(f, f.read_bytes()) for f in files]


def spellings(tensors: Arrays) -> list[bytes]:
    """Each local tensor as float32 and float64 bytes (up to 32-byte windows from its middle)."""
    out = []
    for value in tensors.values():
        for dtype in ("<f4", "<f8"):
            raw = np.asarray(value).astype(dtype).tobytes()
            out.append(raw[max(0, len(raw) // 2 - 16) : len(raw) // 2 + 16])
    return [probe for probe in out if len(probe) >= 8]


def kept(story: Story) -> dict[str, list[dict[str, Any]]]:
    found = {site: states(story.fed, site) for site in SITES}
    if not any(found.values()):
        pytest.skip(f"{story.method} keeps no local training state (every tensor is shared)")
    return found


def test_every_round_closes_with_the_shared_part_only(story: Story) -> None:
    for key, info in story.rounds.items():
        assert info["state"] == "closed", (key, info["reason"])
    with story.fed.admin() as client:
        model = client.get(f"/v1/models/{story.rounds['clear-2']['result_version']}").json()
    card = model["personalization"]
    assert card["method"] == story.method
    assert set(card["shared"]).isdisjoint(card["local"])
    shown = aipipe_in_process(
        "model", "show", model["version"], "--hub", story.fed.hub.url,
        "--token", story.fed.admin_token,
    )  # fmt: skip
    assert f"personalization: {story.method}; the hub federates" in " ".join(shown.stdout.split())


def test_each_node_kept_its_state_for_each_round_it_took_part_in(story: Story) -> None:
    found = kept(story)
    for site, rows in found.items():
        rounds = {(r["study"], r["round"]) for r in rows}
        for key, study, number in (
            ("clear-1", story.clear, 1),
            ("masked-1", story.masked, 1),
            ("clear-2", story.clear, 2),
        ):
            if site in story.rounds[key]["reported"]:
                assert (study, number) in rounds, (site, key)


def test_the_restarted_node_trained_its_second_round_from_its_first_rounds_state(
    story: Story,
) -> None:
    rows = [r for r in kept(story)[RESTARTED] if r["study"] == story.clear]
    assert [r["round"] for r in rows] == [1, 2]
    events = [
        e
        for e in node_audit_events(story.fed.nodes[RESTARTED])
        if e["action"] == "personal.state" and e["resource"] == f"study/{story.clear}"
    ]
    assert [e["details"]["round"] for e in events] == [1, 2]
    assert events[0]["details"]["started_from"] is None
    assert events[1]["details"]["started_from"] == rows[0]["sha256"]
    assert [e["details"]["sha256"] for e in events] == [r["sha256"] for r in rows]


def test_no_hub_file_holds_a_nodes_local_state(story: Story) -> None:
    found = kept(story)
    files = hub_files(story.fed)
    assert files and any(p.name == "hub.sqlite" for p, _ in files)
    for site, rows in found.items():
        for row in rows:
            for probe in spellings(decode_arrays(row["tensors"])):
                leaks = [str(path) for path, data in files if probe in data]
                assert not leaks, f"{site}'s local state ({row['study']}) found in {leaks}"


def test_the_state_search_would_see_a_leak(story: Story, tmp_path: Path) -> None:
    """The search above is not vacuous: a hub file holding a node's state is found."""
    row = next(r for rows in kept(story).values() for r in rows)
    tensors = decode_arrays(row["tensors"])
    leaked = tmp_path / "leak.bin"
    leaked.write_bytes(b"header" + b"".join(v.astype("<f4").tobytes() for v in tensors.values()))
    shutil.copy(leaked, story.fed.hub.home / "blobs" / "leak.bin")
    try:
        files = hub_files(story.fed)
        assert any(probe in data for probe in spellings(tensors) for _, data in files)
    finally:
        (story.fed.hub.home / "blobs" / "leak.bin").unlink()
