"""Issue 15, encryption at rest end to end: a hub and two nodes, every home encrypted under its
own operator key (given as `aipipe --at-rest-key-file FILE ...`), run a federated round over TLS
with real processes; afterwards every model blob and update on the hub is sealed, and no node
file holds the raw FHIR in clear."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from aipipe.secure.at_rest import MAGIC
from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import (
    HEART,
    ProcessGroup,
    _serving_url,
    aipipe,
    aipipe_in_process,
    aipipe_json,
    hub_ca,
    hub_verify,
    utc_stamp,
    wait_until,
    write_test_study,
)

SITES = ("hungarian", "switzerland")
DISPLAY = b"Coronary arteriosclerosis"


def keyed(key: Path, *args: str | Path) -> tuple[str | Path, ...]:
    return ("--at-rest-key-file", key, *args)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("at-rest-e2e")
    keys = {name: root / f"{name}.key" for name in ("hub", *SITES)}
    with ThreadPoolExecutor(max_workers=len(keys)) as pool:  # each key a file of its own
        for made in [pool.submit(aipipe, "keygen", "at-rest", key) for key in keys.values()]:
            made.result()
    group = ProcessGroup(root / "logs")
    try:
        yield _run_round(root, keys, group)
    finally:
        group.stop()


def _run_round(root: Path, keys: dict[str, Path], group: ProcessGroup) -> dict[str, object]:
    hub_home = root / "hub"
    made = aipipe_json(*keyed(keys["hub"], "hub", "init", "--home", hub_home, "--json"))
    hub = group.start("hub", *keyed(keys["hub"], "hub", "serve", "--home", hub_home, "--port", "0"))
    url = wait_until(lambda: _serving_url(hub_home, hub), what="hub to serve",
                     context=hub.log_tail)  # fmt: skip
    admin = {"AIPIPE_HUB_URL": url, "AIPIPE_TOKEN": made["admin_token"],
             "AIPIPE_HUB_CA": str(hub_ca(hub_home))}  # fmt: skip
    study = write_test_study(root / "study.yaml", name="sealed", deadline_s=60.0)

    def enrol(site: str) -> None:
        issued = aipipe_json(*keyed(keys["hub"], "hub", "enrol-token", "--home", hub_home,
                                    "--node", site, "--json"))  # fmt: skip
        home = root / site
        aipipe(*keyed(keys[site], "node", "init", "--home", home, "--name", site, "--json"),
               env={"AIPIPE_ENROL_TOKEN": issued["token"]})  # fmt: skip
        aipipe(*keyed(keys[site], "node", "ingest", "--home", home, HEART / "fhir" / site))

    with ThreadPoolExecutor(max_workers=len(SITES) + 1) as pool:  # sites side by side, as nodes
        enrolments = [pool.submit(enrol, site) for site in SITES]
        aipipe("study", "publish", study, "--json", env=admin)
        for enrolment in enrolments:
            enrolment.result()
    for site in SITES:  # one by one: the in-process runner swaps sys.stdout
        aipipe_in_process(*keyed(keys[site], "node", "approve", "sealed", "--home", root / site))
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {made['admin_token']}"},
                          verify=hub_verify(hub_home), timeout=30)  # fmt: skip
    since = utc_stamp()
    for site in SITES:
        group.start(site, *keyed(keys[site], "node", "start", "--home", root / site,
                                 "--poll", "0.5"))  # fmt: skip
    with client:
        wait_until(lambda: all(n["last_seen"] and n["last_seen"] > since
                               for n in client.get("/v1/nodes").json()),
                   what="both nodes to poll", context=group.logs)  # fmt: skip
        client.post("/v1/studies/sealed/rounds", json={"deadline_s": 60.0}).raise_for_status()
        closed = wait_until(
            lambda: (info := client.get("/v1/studies/sealed/rounds/1").json())["state"]
            in ("closed", "failed") and info,
            what="round 1 to close", timeout_s=90.0, context=group.logs,
        )  # fmt: skip
        version = client.get("/v1/models", params={"study": "sealed"}).json()[-1]
        weights = client.get(f"/v1/models/{version['version']}/weights")
    return {"root": root, "keys": keys, "round": closed, "weights": weights}


def test_an_encrypted_hub_and_nodes_complete_a_round(federation: dict[str, object]) -> None:
    info = federation["round"]
    assert isinstance(info, dict) and info["state"] == "closed", json.dumps(info)
    response = federation["weights"]
    assert isinstance(response, httpx.Response) and response.status_code == 200
    assert decode_arrays(response.content)  # served in clear to an authorised caller


def test_every_model_blob_and_running_sum_on_the_hub_is_sealed(
    federation: dict[str, object],
) -> None:
    root = federation["root"]
    assert isinstance(root, Path)
    blobs = [p for p in (root / "hub" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) >= 2  # the initial model and the round's
    assert all(p.read_bytes().startswith(MAGIC) for p in blobs)
    conn = sqlite3.connect(root / "hub" / "hub.sqlite")
    try:
        [(summed,)] = conn.execute("SELECT sum_blob FROM rounds").fetchall()
    finally:
        conn.close()
    assert summed.startswith(MAGIC)  # the updates folded into the round's sum


def test_no_node_file_holds_the_raw_fhir_in_clear(federation: dict[str, object]) -> None:
    root = federation["root"]
    assert isinstance(root, Path)
    for site in SITES:
        files = [p for p in (root / site).rglob("*") if p.is_file()]
        assert files and not [p for p in files if DISPLAY in p.read_bytes()], site
        assert (HEART / "fhir" / site / "Condition.ndjson").read_bytes().count(DISPLAY)


def test_every_node_key_the_round_used_is_sealed_the_tls_client_key_too(
    federation: dict[str, object],
) -> None:
    root = federation["root"]
    assert isinstance(root, Path)
    for site in SITES:
        for name in ("identity.key", "hub.credential", "client-key.pem", "client-cert.pem"):
            assert (root / site / name).read_bytes().startswith(MAGIC), (site, name)
