"""Secure aggregation end to end: a hub and four hospital nodes as real processes on 127.0.0.1.

One federation serves the module (`story`), which runs two rounds and records what happened:

1. a `secure: secagg` round in which the first node to finish key sharing is SIGKILLed before
   it can send its masked input: the other three complete the round, and the protocol removes
   the dead node's pairwise masks from the sum;
2. a `secure: ckks` round (the killed node restarted): key ceremony, ciphertexts, and a
   key-holding node's checked decryption of the sum.

Each node keeps, in its own home, the plaintext contribution x = [r, r·Δ] it masked or
encrypted (`aipipe.node.vault`). The tests compare the hub's new model with plaintext FedAvg
over exactly those contributions, and search every file the hub wrote (database, WAL, blobs,
audit log, process log) for any of them.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from aipipe.secure.ckks import CkksContext
from aipipe.secure.encoding import fixed_point_codec
from aipipe.secure.errors import CkksContextError
from tests.e2e_support import Federation, aipipe_in_process, audit_events, wait_until
from tests.secure_e2e_support import fedavg, model, sent

pytestmark = pytest.mark.e2e

SITES = ("cleveland", "hungarian", "switzerland", "va")
SECAGG = "e2e-secagg"
CKKS = "e2e-ckks"
# Each stage's timeout. The SecAgg+ round waits out its masking stage for the killed node, so its
# timeout is the test's idle time: short, but ample for three nodes to train 5 steps and mask.
STAGE_S = {"secagg": 10.0, "ckks": 20.0}
ROUND_S = 240.0
UPDATE_CLIP = 10.0
VICTIM = "cleveland"  # the largest site: the slowest to train, the widest window to kill it in


@dataclass
class Story:
    fed: Federation
    victim: str
    secagg: dict[str, Any]
    ckks: dict[str, Any]


def secure_fields(mode: str) -> dict[str, Any]:
    return {
        "secure": mode,
        "min_nodes": 3,
        "secure_options": {"stage_timeout_s": STAGE_S[mode], "update_clip": UPDATE_CLIP},
    }


def kill_after_key_sharing(fed: Federation, site: str) -> None:
    """SIGKILL `site` as soon as it logs that its key shares are out: it then still waits for
    the other nodes' shares and trains before it could mask, a window of a second or more."""
    process = fed.daemons[site]
    end = time.monotonic() + 120
    while "shared keys" not in process.log.read_text(errors="replace"):
        assert process.running() and time.monotonic() < end, fed.group.logs()
        time.sleep(0.01)
    process.kill()


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Story]:
    root = tmp_path_factory.mktemp("secure")
    with Federation.running(
        root, sites=SITES, deadline_s=ROUND_S, study=SECAGG, study_fields=secure_fields("secagg")
    ) as fed:  # the federation's own study is the SecAgg+ one: no study set up for nothing
        fed.publish(CKKS, deadline_s=ROUND_S, secure=secure_fields("ckks"))
        fed.start_daemons(*SITES, poll_s=1.0)

        fed.open_round(study=SECAGG)
        victim = VICTIM
        kill_after_key_sharing(fed, victim)
        secagg = fed.wait_for_round(1, "closed", "failed", study=SECAGG, timeout_s=ROUND_S)

        fed.start_daemons(victim)
        fed.open_round(study=CKKS)
        ckks = fed.wait_for_round(1, "closed", "failed", study=CKKS, timeout_s=ROUND_S)
        yield Story(fed, victim, secagg, ckks)


# -- SecAgg+ --------------------------------------------------------------------------------------


def test_the_secagg_round_completes_without_the_node_killed_after_key_sharing(
    story: Story,
) -> None:
    assert story.secagg["state"] == "closed", story.secagg["reason"]
    assert story.secagg["reported"] == sorted(set(SITES) - {story.victim})


def test_the_killed_node_never_sent_a_masked_input(story: Story) -> None:
    folder = story.fed.nodes[story.victim] / "secure" / "sent" / SECAGG
    assert not folder.exists() or not any(folder.iterdir())


def test_the_secagg_model_equals_plaintext_fedavg_within_the_quantisation_error(
    story: Story,
) -> None:
    info, fed = story.secagg, story.fed
    expected = fedavg(fed, info, info["reported"])
    got = model(fed, info["result_version"])
    codec = fixed_point_codec(UPDATE_CLIP, len(SITES), 32)
    weight = float(np.sum([sent(fed, s, SECAGG)[0] for s in info["reported"]]))
    # Decoding errs by at most e = n/(2·scale) on each of A = Σr·Δ_j and W = Σr, so the mean
    # A/W errs by at most e·(1 + |A/W|)/W ≤ e·(1 + update_clip)/W to first order; 1e-6 covers
    # the float32 weights.
    error = codec.error_bound(len(info["reported"]))
    bound = 1.01 * error * (1 + UPDATE_CLIP) / weight + 1e-6
    for key in expected:
        assert np.max(np.abs(got[key] - expected[key])) <= bound, key


def test_the_hub_audited_the_dropout_at_the_masking_stage(story: Story, tmp_path: Path) -> None:
    events = audit_events(story.fed.hub.home, tmp_path / "hub-audit.jsonl")
    stages = [e for e in events if e["action"] == "round.stage" and SECAGG in e["resource"]]
    masking = [e for e in stages if e["details"]["stage"] == "masking"]
    assert masking and masking[0]["details"]["dropped"] == [story.victim]


# -- CKKS -----------------------------------------------------------------------------------------


def test_the_ckks_round_completes_with_every_node(story: Story) -> None:
    assert story.ckks["state"] == "closed", story.ckks["reason"]
    assert story.ckks["reported"] == sorted(SITES)


def test_the_decrypted_ckks_model_matches_plaintext_fedavg_to_1e_4_relative(story: Story) -> None:
    info, fed = story.ckks, story.fed
    expected = fedavg(fed, info, info["reported"])
    got = model(fed, info["result_version"])
    base = model(fed, info["base_version"])
    for key in expected:
        step, want = got[key] - base[key], expected[key] - base[key]
        assert np.linalg.norm(step - want) <= 1e-4 * np.linalg.norm(want), key


def hub_public_context(fed: Federation) -> bytes:
    conn = sqlite3.connect(f"file:{fed.hub.home / 'hub.sqlite'}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT public_context FROM ckks_keys WHERE study = ?", (CKKS,))
        return bytes(row.fetchone()[0])
    finally:
        conn.close()


def test_the_context_the_hub_holds_cannot_decrypt(story: Story) -> None:
    public = CkksContext.from_bytes(hub_public_context(story.fed))
    secret = CkksContext.from_bytes(
        (story.fed.nodes[SITES[0]] / "secure" / f"ckks-{CKKS}.context").read_bytes()
    )
    ciphertext = secret.encrypt(np.ones(4))

    assert not public.is_private
    assert public.fingerprint == secret.fingerprint
    with pytest.raises(CkksContextError):
        public.decrypt(ciphertext)


def test_no_hub_file_holds_a_nodes_secret_ckks_key(story: Story) -> None:
    secret = (story.fed.nodes[SITES[0]] / "secure" / f"ckks-{CKKS}.context").read_bytes()
    probe = secret[len(secret) // 2 : len(secret) // 2 + 64]
    assert not [path for path, data in hub_files(story.fed) if probe in data]


# -- nothing in clear at the hub ------------------------------------------------------------------


def hub_files(fed: Federation) -> list[tuple[Path, bytes]]:
    """Every file the hub wrote: its home (store, WAL, blobs, audit log) and its process logs."""
    roots = [fed.hub.home] + [p.log for p in fed.group.started if p.name == "hub"]
    files = [f for r in roots for f in ([r] if r.is_file() else r.rglob("*")) if f.is_file()]
    return [(f, f.read_bytes()) for f in files]


def spellings(x: npt.NDArray[np.float64], codec_nodes: int) -> list[bytes]:
    """32-byte windows of the contribution as float64 and float32, with and without the weight,
    unweighted (Δ itself), and fixed-point encoded: any of them in a hub file is a leak."""
    delta = x[1:] / x[0]
    forms = [x, x[1:], delta]
    out = [f.astype(dtype).tobytes() for f in forms for dtype in ("<f8", "<f4")]
    out.append(fixed_point_codec(UPDATE_CLIP, codec_nodes, 32).encode(x).tobytes())
    return [b[len(b) // 2 - 16 : len(b) // 2 + 16] for b in out]


@pytest.mark.parametrize("study", [SECAGG, CKKS])
def test_no_hub_file_holds_a_nodes_plaintext_contribution(story: Story, study: str) -> None:
    info = story.secagg if study == SECAGG else story.ckks
    files = hub_files(story.fed)
    assert files and any(p.name == "hub.sqlite" for p, _ in files)
    for site in info["reported"]:
        for probe in spellings(sent(story.fed, site, study), len(SITES)):
            leaks = [str(path) for path, data in files if probe in data]
            assert not leaks, f"{site}'s contribution found in {leaks}"


def test_the_plaintext_check_would_see_a_leak(story: Story, tmp_path: Path) -> None:
    """The search above is not vacuous: a file holding a contribution is found."""
    x = sent(story.fed, story.secagg["reported"][0], SECAGG)
    leaked = tmp_path / "leak.bin"
    leaked.write_bytes(b"header" + x[1:].astype("<f4").tobytes() + b"trailer")
    shutil.copy(leaked, story.fed.hub.home / "blobs" / "leak.bin")
    try:
        files = hub_files(story.fed)
        assert any(probe in data for probe in spellings(x, len(SITES)) for _, data in files)
    finally:
        (story.fed.hub.home / "blobs" / "leak.bin").unlink()


# -- no ε spent, n_test or evaluation number at the hub (DESIGN §12) ------------------------------


def epsilon_spent(fed: Federation, site: str, study: str) -> float:
    """ε the node's ledger holds for `study`: what the old signed header carried."""
    result = aipipe_in_process("privacy", "status", "--home", fed.nodes[site], "--json")
    (status,) = [s for s in json.loads(result.stdout)["studies"] if s["study"] == study]
    return float(status["spent"])


def number_spellings(value: float) -> list[bytes]:
    """Decimal text (repr and 6 places) and little-endian float64/float32 of `value`."""
    return [repr(value).encode(), f"{value:.6f}".encode()] + [
        struct.pack(f, value) for f in ("<d", "<f")
    ]


def test_no_hub_file_holds_a_nodes_epsilon_spent(story: Story) -> None:
    files = hub_files(story.fed)
    for site in story.secagg["reported"]:
        probes = number_spellings(epsilon_spent(story.fed, site, SECAGG))
        leaks = [str(path) for path, data in files for probe in probes if probe in data]
        assert not leaks, f"{site}'s ε spent found in {leaks}"


def test_the_epsilon_search_would_see_a_leak(story: Story) -> None:
    """Control: an ε written as the old header wrote it (JSON) is found."""
    site = story.secagg["reported"][0]
    value = epsilon_spent(story.fed, site, SECAGG)
    planted = json.dumps({"epsilon_spent": value}).encode()
    assert any(probe in planted for probe in number_spellings(value))


def test_the_hub_holds_no_evaluation_number_for_a_secure_model(story: Story) -> None:
    """Every node that evaluated the SecAgg+ model told the hub so, and nothing else."""
    version = story.secagg["result_version"]
    with story.fed.admin() as client:

        def evaluated() -> dict[str, Any] | None:
            shown: dict[str, Any] = client.get(f"/v1/models/{version}").json()["metrics"]
            return shown if set(story.secagg["reported"]) <= set(shown) else None

        metrics = wait_until(evaluated, what="the nodes to evaluate the SecAgg+ model")
    assert [v for m in metrics.values() for v in m.values() if v is not None] == []
