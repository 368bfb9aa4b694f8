"""A personalized study end to end (issue 13, Tests): a hub and four hospital nodes as real
processes on 127.0.0.1, the shipped heart-disease data, an mlp, DP-SGD (RDP accountant), and
`personalization: fedper` (the body is federated, the head stays at each node).

One federation (`story`) runs round 1 of the study in the clear and round 1 of a copy under
SecAgg+, kills a node and restarts it, starts that node's CDS service (`aipipe node serve-cds`)
and runs round 2 in the clear. Each node keeps its local training state
(`aipipe.node.personal_state`) and, per evaluated version, its personal model
(`aipipe.node.personal`) in its own store. The tests show that

- no hub file (database, WAL, blobs, audit log, process log) holds the bytes of either, with a
  control that finds a planted copy;
- the restarted node keeps its training state and its personal model, and serves the latter
  (`aipipe node personal --json`, `node serve-cds`) after the restart;
- the card the node's CDS service returns carries the probability of the node's personal model,
  computed here from the weights in its store, not the global model's; the hub's own CDS
  withholds the study (FedPer's global head is the hub's initialisation: it predicts nothing).

The other methods' update rules are unit-tested (tests/test_personalization*.py); one method
here keeps this file within the CI budget.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from aipipe.cds import PatientScorer
from aipipe.node.home import open_node, open_store
from aipipe.personalization import personalizer_for
from aipipe.study.features import site_preprocessor
from aipipe.study.spec import StudySpec
from aipipe.wire.tensors import Arrays, decode_arrays
from tests.cds_support import read_ndjson, searchset
from tests.e2e_support import (
    HEART,
    Federation,
    Started,
    aipipe,
    aipipe_in_process,
    node_audit_events,
    wait_until,
)

pytestmark = pytest.mark.e2e

SITES = ("cleveland", "hungarian", "switzerland", "va")
METHOD = "fedper"
CLEAR, MASKED = f"{METHOD}-clear", f"{METHOD}-secagg"
ROUND_S = 120.0
# The daemons' long-poll wait (`node start --poll`): the hub answers a poll as soon as there is
# work, and SIGTERM ends an idle one, so a long wait costs no latency, where a short one costs
# a request per node every POLL_S on two busy cores.
POLL_S = 5.0
RESTARTED = "hungarian"  # also the node whose CDS service is called


@dataclass
class Story:
    fed: Federation
    rounds: dict[str, dict[str, Any]]  # "clear-1", "masked-1", "clear-2" → round info
    before_kill: list[dict[str, Any]]  # the restarted node's personal models before the kill
    listed: dict[str, Any]  # `aipipe node personal --json` of the restarted node, after it
    cds: str  # base URL of the restarted node's `node serve-cds`


def study_of(key: str) -> str:
    return MASKED if key.startswith("masked") else CLEAR


def personal_fields(secure: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": {"kind": "mlp", "hidden": [8]},
        "personalization": {"method": METHOD},
        "secure": secure,
        # RDP calibrates σ in a second where PRV takes several: the e2e test's time is the
        # nodes' start-up and σ's calibration, not training
        "privacy": {"mode": "dp", "epsilon": 1.0, "delta": 1e-5, "clip": 0.5, "accountant": "rdp"},
    }
    if secure != "none":  # a stage waits for nodes still calibrating σ for the new study
        fields.update(min_nodes=3, secure_options={"stage_timeout_s": 60.0})
    return fields


# -- reading a node's store without taking a lock -----------------------------------------------


def rows(fed: Federation, site: str, table: str) -> list[dict[str, Any]]:
    """Every row of a node's `table` (personal_states, personal_models); [] before it exists."""
    path = fed.nodes[site] / "store.sqlite"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
        found = (
            conn.execute(f"SELECT * FROM {table} ORDER BY study, round").fetchall()
            if exists
            else []
        )
    finally:
        conn.close()
    return [dict(row) for row in found]


def states(fed: Federation, site: str) -> list[dict[str, Any]]:
    return rows(fed, site, "personal_states")


def personals(fed: Federation, site: str) -> list[dict[str, Any]]:
    return rows(fed, site, "personal_models")


def wait_for_personal(fed: Federation, study: str, version: str, sites: list[str]) -> None:
    """Until each of `sites` has made its personal model from `version` (at its evaluate)."""

    def made() -> bool:
        return all(
            any(r["study"] == study and r["version"] == version for r in personals(fed, site))
            for site in sites
        )

    wait_until(made, what=f"personal models of {study} {version[:12]} at {sites}",
               timeout_s=ROUND_S, context=fed.group.logs)  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_cds(fed: Federation, site: str, study: str) -> tuple[Started, str]:
    """`aipipe node serve-cds` for one node, as a real process on loopback (no client JWT)."""
    port = free_port()
    server = fed.group.start(f"{site}-cds", "node", "serve-cds", "--home", fed.nodes[site],
                             "--study", study, "--port", str(port),
                             "--allow-unauthenticated")  # fmt: skip
    return server, f"http://127.0.0.1:{port}"


def cds_ready(server: Started, base: str) -> bool:
    if not server.running():
        raise AssertionError(f"node serve-cds exited early\n{server.log_tail()}")
    try:
        return httpx.get(f"{base}/cds-services", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# -- the federation ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    root = tmp_path_factory.mktemp("personal")
    hub_config = {"cds_allow_unauthenticated": True}  # loopback only: the hub's CDS is asked
    with Federation.running(
        root, sites=SITES, deadline_s=ROUND_S, study=CLEAR, study_fields=personal_fields("none"),
        hub_config=hub_config,
    ) as fed:  # fmt: skip
        with ThreadPoolExecutor(max_workers=1) as pool:  # the daemons start while it publishes
            started = pool.submit(fed.start_daemons, *SITES, poll_s=POLL_S)
            fed.publish(MASKED, deadline_s=ROUND_S, secure=personal_fields("secagg"))
            started.result()
        rounds: dict[str, dict[str, Any]] = {}
        for study in (CLEAR, MASKED):  # both at once: the nodes work through them in turn
            fed.open_round(study=study)
        for key, study in (("clear-1", CLEAR), ("masked-1", MASKED)):
            rounds[key] = fed.wait_for_round(1, "closed", "failed", study=study,
                                             timeout_s=ROUND_S)  # fmt: skip
            assert rounds[key]["state"] == "closed", (key, rounds[key]["reason"])
        for key, study in (("clear-1", CLEAR), ("masked-1", MASKED)):
            wait_for_personal(fed, study, rounds[key]["result_version"], [RESTARTED])
        before_kill = personals(fed, RESTARTED)
        fed.daemons[RESTARTED].kill()  # between rounds: what it keeps is in its store
        # The restarted daemon, its CDS service and `node personal` start side by side; the
        # CDS service picks its model when it starts, so round 2 opens once it serves.
        server, cds = serve_cds(fed, RESTARTED, CLEAR)
        with ThreadPoolExecutor(max_workers=1) as pool:
            listing = pool.submit(
                aipipe, "node", "personal", "--home", fed.nodes[RESTARTED], "--study", CLEAR,
                "--json",
            )  # fmt: skip
            fed.start_daemons(RESTARTED, poll_s=POLL_S)
            listed = json.loads(listing.result().stdout)
        wait_until(lambda: cds_ready(server, cds), what="node serve-cds", context=server.log_tail)
        fed.open_round(study=CLEAR)
        rounds["clear-2"] = fed.wait_for_round(2, "closed", "failed", study=CLEAR,
                                               timeout_s=ROUND_S)  # fmt: skip
        for key, info in rounds.items():  # every node's personal model, for the hub search
            if info["state"] == "closed":
                wait_for_personal(fed, study_of(key), info["result_version"],
                                  sorted(info["reported"]))  # fmt: skip
        yield Story(fed, rounds, before_kill, listed, cds)


# -- what the hub holds ------------------------------------------------------------------------


def hub_files(fed: Federation) -> list[tuple[Path, bytes]]:
    """Every file the hub wrote: its home (store, WAL, blobs, audit log) and its process logs."""
    roots = [fed.hub.home] + [p.log for p in fed.group.started if p.name == "hub"]
    files = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*")) if f.is_file()]
    return [(f, f.read_bytes()) for f in files]


def spellings(tensors: Arrays) -> list[bytes]:
    """Each tensor as float32 and float64 bytes (up to 32-byte windows from its middle)."""
    out = []
    for value in tensors.values():
        for dtype in ("<f4", "<f8"):
            raw = np.asarray(value).astype(dtype).tobytes()
            out.append(raw[max(0, len(raw) // 2 - 16) : len(raw) // 2 + 16])
    return [probe for probe in out if len(probe) >= 8]


def leaks(files: list[tuple[Path, bytes]], tensors: Arrays) -> list[str]:
    probes = spellings(tensors)
    assert probes, "nothing to search for"
    return [str(path) for path, data in files if any(probe in data for probe in probes)]


def global_weights(fed: Federation, version: str) -> Arrays:
    with fed.admin() as client:
        response = client.get(f"/v1/models/{version}/weights")
    assert response.status_code == 200, response.text
    return decode_arrays(response.content)


def split_of(fed: Federation, version: str) -> tuple[list[str], list[str]]:
    """(shared, local) tensor names of a version, as the hub's model card states them."""
    card = fed.get(f"/v1/models/{version}")["personalization"]
    return list(card["shared"]), list(card["local"])


def personal_part(fed: Federation, row: dict[str, Any]) -> Arrays:
    """A personal model's own tensors: its local part (and its carry). Its shared part is the
    global version's, tensor for tensor: that is on the hub by design."""
    weights, shared, local = decode_arrays(row["weights"]), *split_of(fed, row["version"])
    hub = global_weights(fed, row["version"])
    assert set(weights) == set(shared) | set(local) and local, sorted(weights)
    for name in shared:
        assert np.array_equal(weights[name], hub[name]), (row["study"], name)
    for name in local:  # trained at the node: not the hub's initialisation
        assert not np.array_equal(weights[name], hub[name]), (row["study"], name)
    return {**{name: weights[name] for name in local}, **decode_arrays(row["carry"])}


def label(row: dict[str, Any]) -> str:
    return f"personal-{row['sha256'][:16]}-{row['version']}"


# -- the tests ---------------------------------------------------------------------------------


def test_every_round_closes_with_the_shared_part_only(
    story: Story, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIPIPE_HUB_CA", str(story.fed.hub.ca))  # the hub's HTTPS
    for key, info in story.rounds.items():
        assert info["state"] == "closed", (key, info["reason"])
    with story.fed.admin() as client:
        model = client.get(f"/v1/models/{story.rounds['clear-2']['result_version']}").json()
    card = model["personalization"]
    assert card["method"] == METHOD
    assert set(card["shared"]).isdisjoint(card["local"])
    shown = aipipe_in_process(
        "model", "show", model["version"], "--hub", story.fed.hub.url,
        "--token", story.fed.admin_token,
    )  # fmt: skip
    assert f"personalization: {METHOD}; the hub federates" in " ".join(shown.stdout.split())


def test_each_node_kept_its_state_and_personal_model_for_each_round(story: Story) -> None:
    for site in SITES:
        trained = {(r["study"], r["round"]) for r in states(story.fed, site)}
        made = {(r["study"], r["version"]) for r in personals(story.fed, site)}
        for key, info in story.rounds.items():
            number = int(key[-1])
            if site in info["reported"]:
                assert (study_of(key), number) in trained, (site, key)
                assert (study_of(key), info["result_version"]) in made, (site, key)


def test_the_restarted_node_trained_its_second_round_from_its_first_rounds_state(
    story: Story,
) -> None:
    kept = [r for r in states(story.fed, RESTARTED) if r["study"] == CLEAR]
    assert [r["round"] for r in kept] == [1, 2]
    events = [
        e
        for e in node_audit_events(story.fed.nodes[RESTARTED])
        if e["action"] == "personal.state" and e["resource"] == f"study/{CLEAR}"
    ]
    assert [e["details"]["round"] for e in events] == [1, 2]
    assert events[0]["details"]["started_from"] is None
    assert events[1]["details"]["started_from"] == kept[0]["sha256"]
    assert [e["details"]["sha256"] for e in events] == [r["sha256"] for r in kept]


def test_the_restarted_node_kept_its_personal_model_and_serves_it(story: Story) -> None:
    made = [r for r in story.before_kill if r["study"] == CLEAR]
    assert [r["version"] for r in made] == [story.rounds["clear-1"]["result_version"]]
    after = {(r["study"], r["version"]): r for r in personals(story.fed, RESTARTED)}
    for row in story.before_kill:  # still there, byte for byte
        kept = after[(row["study"], row["version"])]
        assert (kept["sha256"], kept["weights"]) == (row["sha256"], row["weights"])
    # `aipipe node personal --json`, run after the kill: the model made before it is served
    assert story.listed["study"] == CLEAR and story.listed["served"] == label(made[0])
    assert [(m["sha256"], m["served"]) for m in story.listed["models"]] == [
        (made[0]["sha256"], True)
    ]
    audited = [
        e["details"]["sha256"]
        for e in node_audit_events(story.fed.nodes[RESTARTED])
        if e["action"] == "personal.model" and e["details"]["study"] == CLEAR
    ]
    assert audited[0] == made[0]["sha256"]


def test_no_hub_file_holds_a_nodes_training_state_or_personal_model(story: Story) -> None:
    files = hub_files(story.fed)
    assert files and any(p.name == "hub.sqlite" for p, _ in files)
    searched = 0
    for site in SITES:
        for row in states(story.fed, site):
            found = leaks(files, decode_arrays(row["tensors"]))
            assert not found, f"{site}'s training state ({row['study']}) found in {found}"
            searched += 1
        for row in personals(story.fed, site):
            found = leaks(files, personal_part(story.fed, row))
            assert not found, f"{site}'s personal model ({row['study']}) found in {found}"
            searched += 1
    # per site: a state and a personal model for clear-1, masked-1 and clear-2
    assert searched >= 2 * 3 * len(SITES)


@pytest.mark.parametrize("table", ["personal_states", "personal_models"])
def test_the_search_would_see_a_leak(story: Story, table: str) -> None:
    """The search above is not vacuous: a hub file holding a node's tensors is found."""
    row = rows(story.fed, RESTARTED, table)[0]
    tensors = (
        decode_arrays(row["tensors"])
        if table == "personal_states"
        else personal_part(story.fed, row)
    )
    planted = story.fed.hub.home / "blobs" / "leak.bin"
    planted.write_bytes(b"header" + b"".join(v.astype("<f4").tobytes() for v in tensors.values()))
    try:
        assert leaks(hub_files(story.fed), tensors) == [str(planted)]
    finally:
        planted.unlink()


def site_records(site: str) -> dict[str, list[dict[str, Any]]]:
    """A hospital's FHIR resources (Patient, Observation, Condition) by patient id."""
    by_patient: dict[str, list[dict[str, Any]]] = {}
    for name in ("Patient", "Observation", "Condition"):
        for resource in read_ndjson(HEART / "fhir" / site / f"{name}.ndjson"):
            ref = resource["id"] if name == "Patient" else resource["subject"]["reference"]
            by_patient.setdefault(ref.removeprefix("Patient/"), []).append(resource)
    return by_patient


def test_the_nodes_cds_card_carries_its_personal_models_probability(story: Story) -> None:
    fed, home = story.fed, story.fed.nodes[RESTARTED]
    served = next(r for r in story.before_kill if label(r) == story.listed["served"])
    store = open_store(open_node(home))
    try:
        approval = store.approval(CLEAR)
        assert approval is not None
        spec = StudySpec.model_validate(json.loads(approval[1]))
        preprocessor = site_preprocessor(store, spec)
    finally:
        store.close()
    assert personalizer_for(spec).name == METHOD and spec.validation is None
    # The probabilities the node's own scoring path gives with the weights in its store, and
    # with the global version they were derived from.
    mine = PatientScorer(spec, decode_arrays(served["weights"]), preprocessor, label(served))
    hub = PatientScorer(spec, global_weights(fed, served["version"]), preprocessor, "global")
    today = datetime.now(UTC).date()
    records = site_records(RESTARTED)
    scored: dict[str, tuple[float, float]] = {}  # patient → (personal, global) probability
    for pid in sorted(records)[:40]:
        personal = mine.score(records[pid], patient_id=pid, as_of=today).probability
        general = hub.score(records[pid], patient_id=pid, as_of=today).probability
        if personal is not None and general is not None:
            scored[pid] = (personal, general)
    # the patient on whom the two models disagree most: a card shows 4 decimals
    pid = max(scored, key=lambda p: abs(scored[p][0] - scored[p][1]))
    expected, theirs = scored[pid]
    assert abs(expected - theirs) > 1e-3, scored[pid]

    resources = records[pid]
    request = {
        "hook": "patient-view",
        "hookInstance": "5f0a4c1e-2b7d-4c38-9a41-0c6f3e2d9b17",
        "context": {"userId": "Practitioner/example", "patientId": pid},
        "prefetch": {
            "patient": next(r for r in resources if r["resourceType"] == "Patient"),
            "observations": searchset([r for r in resources if r["resourceType"] == "Observation"]),
            "conditions": searchset([r for r in resources if r["resourceType"] == "Condition"]),
        },
    }
    response = httpx.post(f"{story.cds}/cds-services/{CLEAR}-patient-view", json=request,
                          timeout=60)  # fmt: skip

    assert response.status_code == 200, response.text
    (card,) = response.json()["cards"]
    risk = card["suggestions"][0]["actions"][0]["resource"]
    assert risk["subject"]["reference"] == f"Patient/{pid}"
    assert risk["method"]["coding"][0]["code"] == label(served)
    probability = risk["prediction"][0]["probabilityDecimal"]
    assert probability == round(expected, 4)
    assert probability != round(theirs, 4)


def test_the_hubs_own_cds_withholds_the_study(story: Story) -> None:
    hub, verify = story.fed.hub.url, story.fed.hub.verify
    discovery = httpx.get(f"{hub}/cds-services", timeout=30, verify=verify)
    assert discovery.status_code == 200, discovery.text
    served = {s["id"] for s in discovery.json()["services"]}
    assert not any(s.startswith((CLEAR, MASKED)) for s in served), served
    endpoint = f"{hub}/cds-services/{CLEAR}-patient-view"
    refused = httpx.post(endpoint, timeout=30, verify=verify, json={
        "hook": "patient-view", "hookInstance": "0b9e3c57-61a4-4f0e-8d2a-7c5e1f4b3a90",
        "context": {"userId": "Practitioner/example", "patientId": "hungarian-0001"},
    })  # fmt: skip
    assert refused.status_code == 404, refused.text
    withheld = [
        e for e in node_audit_events(story.fed.hub.home)
        if e["action"] == "cds.withheld" and e["resource"] == f"study/{CLEAR}"
    ]  # fmt: skip
    assert withheld and "personalized" in withheld[-1]["details"]["reason"]
