"""The attack harness at a real node (issue 14): `aipipe node start --attack NAME[:PARAM]` is
hidden from --help, warns, audits `attack.enabled`, and the update it sends is poisoned exactly
as the attack says (a sign flip: the hub's FedAvg model is base + (−n_a·Δ_a + n_b·Δ_b)/(n_a+n_b)).

The study is plaintext, without DP and with full-batch SGD, so that each node's honest Δ is a
function of its data and the base model alone and the test can compute it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from aipipe.models import arrays_to_model, build_model
from aipipe.models.training import train_local
from aipipe.node.home import open_node, open_store
from aipipe.study.features import extract
from aipipe.study.spec import StudySpec
from aipipe.wire.tensors import decode_arrays
from tests.e2e_support import (
    EXAMPLE_STUDY,
    HEART,
    ProcessGroup,
    aipipe,
    aipipe_in_process,
    aipipe_json,
    node_audit_events,
    start_hub,
    wait_until,
)

ATTACKER, HONEST = "switzerland", "va"


def test_the_attack_option_is_hidden_from_help_but_taken(tmp_path: Path) -> None:
    shown = aipipe_in_process("node", "start", "--help").output
    assert "--once" in shown
    assert "--attack" not in shown
    refused = aipipe("node", "start", "--home", tmp_path, "--attack", "poison", check=False)
    assert refused.returncode != 0
    assert "unknown attack 'poison'" in refused.stderr + refused.stdout


def _study(path: Path) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw.update(
        name="attack-e2e",
        training={"rounds": 1, "local_steps": 3, "batch_size": 1000, "lr": 0.5},
        privacy={"mode": "none"},
        min_nodes=2,
        round_deadline_s=120,
    )
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def _honest_delta(home: Path, spec: StudySpec, base: dict[str, np.ndarray]) -> tuple[Any, int]:
    """The node's own update, recomputed here: full-batch SGD does not depend on the seed."""
    store = open_store(open_node(home))
    try:
        matrix = extract(store, spec)
    finally:
        store.close()
    model = arrays_to_model(base, build_model(spec.model, len(matrix.columns)))
    result = train_local(model, matrix.x_train, matrix.y_train, training=spec.training,
                         privacy=spec.privacy, noise_multiplier=None, global_weights=base,
                         seed=1)  # fmt: skip
    return result.delta, result.num_examples


def test_a_sign_flipping_node_sends_minus_its_update_and_audits_the_attack(
    tmp_path: Path,
) -> None:
    group = ProcessGroup(tmp_path / "logs")
    try:
        token = aipipe_json("hub", "init", "--home", tmp_path / "hub", "--name", "e2e", "--json")
        hub = start_hub(group, tmp_path / "hub")
        admin = {"AIPIPE_HUB_URL": hub.url, "AIPIPE_TOKEN": token["admin_token"],
                 "AIPIPE_HUB_CA": str(hub.ca)}  # fmt: skip
        homes = {site: tmp_path / site for site in (ATTACKER, HONEST)}

        def enrol(site: str) -> None:
            issued = aipipe_json("hub", "enrol-token", "--home", hub.home, "--node", site, "--json")
            aipipe("node", "init", "--home", homes[site], "--name", site, "--allow-non-private",
                   "--json", env={"AIPIPE_ENROL_TOKEN": issued["token"]})  # fmt: skip
            aipipe("node", "ingest", "--home", homes[site], HEART / "fhir" / site, "--json")

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(enrol, homes))
        raw = _study(tmp_path / "study.yaml")
        aipipe("study", "publish", tmp_path / "study.yaml", "--json", env=admin)
        for home in homes.values():
            aipipe_in_process("node", "approve", raw["name"], "--home", home, "--json")
        headers = {"Authorization": f"Bearer {token['admin_token']}"}
        with httpx.Client(base_url=hub.url, headers=headers, timeout=30,
                          verify=hub.verify) as client:  # fmt: skip
            opened = client.post(f"/v1/studies/{raw['name']}/rounds", json={}).json()
            base = decode_arrays(client.get(f"/v1/models/{opened['base_version']}/weights").content)

            def start(site: str) -> Any:
                extra = ["--attack", "sign_flip"] if site == ATTACKER else []
                return aipipe("node", "start", "--home", homes[site], "--once", "--poll", "0",
                              *extra)  # fmt: skip

            with ThreadPoolExecutor(max_workers=2) as pool:
                runs = dict(zip(homes, pool.map(start, homes), strict=True))

            def closed() -> Any:
                info = client.get(f"/v1/studies/{raw['name']}/rounds/{opened['round']}").json()
                return info if info["state"] == "closed" else None

            info = wait_until(closed, what="the round to close", timeout_s=60)
            result = decode_arrays(
                client.get(f"/v1/models/{info['result_version']}/weights").content
            )
    finally:
        group.stop()

    assert "MALICIOUS" in runs[ATTACKER].stderr and "MALICIOUS" not in runs[HONEST].stderr
    enabled = [e for e in node_audit_events(homes[ATTACKER]) if e["action"] == "attack.enabled"]
    assert [e["details"]["attack"] for e in enabled] == ["sign_flip"]
    assert not [e for e in node_audit_events(homes[HONEST]) if e["action"] == "attack.enabled"]

    spec = StudySpec.model_validate(raw)
    bad, n_bad = _honest_delta(homes[ATTACKER], spec, base)
    good, n_good = _honest_delta(homes[HONEST], spec, base)
    for key in base:
        poisoned = base[key] + (-n_bad * bad[key] + n_good * good[key]) / (n_bad + n_good)
        honest = base[key] + (n_bad * bad[key] + n_good * good[key]) / (n_bad + n_good)
        np.testing.assert_allclose(result[key], poisoned, atol=1e-5)
        assert not np.allclose(result[key], honest, atol=1e-3)
