"""Issue 15, encryption at rest: a node or hub home made with an operator's key seals its private
files, the node store's raw FHIR and personal tensors, and the hub's model blobs with
AES-256-GCM (aipipe.secure.at_rest); a missing, wrong or loosely kept key is a clear error;
`rekey` rotates the key, crash-safely.

Real homes throughout: the shipped heart-disease FHIR plus one planted Patient with a name and an
MRN, ingested through the node; the CLI through Typer's CliRunner.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import anyio
import numpy as np
import pyotp
import pytest

from aipipe.audit.log import AuditLog
from aipipe.errors import AtRestKeyError, SealedDataError
from aipipe.hub.home import load_hub
from aipipe.hub.hub import Hub
from aipipe.node.node import Node
from aipipe.node.personal_pending import Pending, PendingPersonal
from aipipe.node.round_state import RoundStates, SecAggRoundState
from aipipe.node.vault import SecureVault
from aipipe.secure.at_rest import MAGIC, AtRest, AtRestKey
from aipipe.secure.rekey import reseal_files, rotate
from aipipe.settings import load_node_config, save_node_config
from aipipe.store.node_store import SEALED_COLUMNS
from aipipe.study.raw import raw_matrix
from aipipe.study.spec import load_study
from aipipe.wire import RoundWork
from aipipe.wire.people import TokenRequest
from aipipe.wire.tensors import TensorDecodeError, decode_arrays, encode_arrays
from tests.cli_support import assert_user_error, invoke
from tests.test_packaging import compose, pod_spec, run_script

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart-disease"
SITE = EXAMPLE / "fhir" / "switzerland"
STUDY_FILE = EXAMPLE / "study.yaml"
NAME, MRN, DISPLAY = "Quixotewright", "MRN-55501234", "Coronary arteriosclerosis"
BIRTH = "1961-04-02"
NEEDLES = (NAME.encode(), MRN.encode(), DISPLAY.encode(), BIRTH.encode())
PLANTED = {
    "resourceType": "Patient",
    "id": "planted-0001",
    "meta": {"lastUpdated": "2024-01-01T00:00:00Z", "versionId": "1"},
    "identifier": [{"system": "urn:oid:1.2.3.4", "value": MRN}],
    "name": [{"family": NAME, "given": ["Zebulon"]}],
    "gender": "female",
    "birthDate": BIRTH,
}
FILLED = {"resources.json", "patients.birth_date", "patients.sex", "observations.value",
          "observations.unit", "conditions.clinical_status"}  # fmt: skip
KEY_ENV = ("AIPIPE_AT_REST_KEY_FILE", "AIPIPE_AT_REST_KEY")


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)


def make_key(path: Path) -> Path:
    result = invoke("keygen", "at-rest", path)
    assert result.exit_code == 0, result.output
    return path


def key_id(path: Path) -> str:
    return AtRestKey.from_file(path).key_id


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("planted")
    (folder / "Patient.ndjson").write_text(json.dumps(PLANTED) + "\n")
    return folder


def ingested_home(root: Path, planted: Path, key: Path | None) -> Path:
    home = root / ("sealed" if key else "plain")
    extra = ["--at-rest-key-file", str(key)] if key else []
    made = invoke("node", "init", "--home", home, "--name", "basel", *extra)
    assert made.exit_code == 0, made.output
    before = ["node", "--at-rest-key-file", str(key)] if key else ["node"]
    loaded = invoke(*before, "ingest", "--home", home, SITE, planted)
    assert loaded.exit_code == 0, loaded.output
    return home


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, planted: Path) -> tuple[Path, Path]:
    """An encrypted node home after an ingest of the example data: (home, key file)."""
    root = tmp_path_factory.mktemp("sealed")
    key = make_key(root / "at-rest.key")
    return ingested_home(root, planted, key), key


def every_file(home: Path) -> Iterator[Path]:
    return (p for p in home.rglob("*") if p.is_file())


def found(home: Path, needle: bytes) -> list[str]:
    return [str(p.relative_to(home)) for p in every_file(home) if needle in p.read_bytes()]


# -- the primitive ---------------------------------------------------------------------------


def test_a_sealed_value_opens_only_under_its_key_and_for_its_label() -> None:
    key, other = AtRestKey.generate(), AtRestKey.generate()
    sealed = AtRest(key).seal(b"weights", "blob:abc")

    assert sealed.startswith(MAGIC) and b"weights" not in sealed
    assert AtRest(key).open(sealed, "blob:abc", where="x") == b"weights"
    with pytest.raises(SealedDataError, match="sealed for 'blob:abc', not for 'blob:def'"):
        AtRest(key).open(sealed, "blob:def", where="x")
    with pytest.raises(AtRestKeyError, match=f"{key.key_id} but the key given is {other.key_id}"):
        AtRest(other).open(sealed, "blob:abc", where="x")
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealedDataError, match="altered"):
        AtRest(key).open(flipped, "blob:abc", where="x")


def test_a_key_id_names_the_key_without_revealing_it(tmp_path: Path) -> None:
    key = AtRestKey.generate()
    key.write(tmp_path / "k")
    text = (tmp_path / "k").read_text()

    assert AtRestKey.from_file(tmp_path / "k").key_id == key.key_id
    assert key.key_id not in text and len(key.key_id) == 16
    assert repr(key) == f"AtRestKey(id={key.key_id})"
    assert AtRestKey.from_text(bytes(32).hex(), source="hex").key_id != key.key_id


# -- the node home ---------------------------------------------------------------------------


def test_no_phi_from_the_ingested_resources_is_readable_in_any_file_of_an_encrypted_home(
    sealed: tuple[Path, Path], planted: Path, tmp_path: Path
) -> None:
    home, _ = sealed
    control = ingested_home(tmp_path, planted, None)  # the same data, not encrypted

    for needle in NEEDLES:
        assert found(control, needle), needle  # the grep finds what is there in clear
        assert found(home, needle) == [], needle
    for name in ("identity.key", "pseudonym.key", "sealing.key"):
        data = (home / name).read_bytes()
        assert data.startswith(MAGIC) and b"PRIVATE KEY" not in data, name
    assert b"PRIVATE KEY" in (control / "identity.key").read_bytes()


def test_the_store_seals_every_value_no_query_filters_on_and_a_plain_store_none(
    sealed: tuple[Path, Path], planted: Path, tmp_path: Path
) -> None:
    home, _ = sealed
    control = ingested_home(tmp_path, planted, None)
    after_a_round = ("kept_versions",)  # the personal tables and these exist after a round only
    queried = [(t, c) for t, c in SEALED_COLUMNS
               if not t.startswith("personal_") and t not in after_a_round]  # fmt: skip
    for table, column in queried:
        kinds = {typeof for (typeof,) in sqlite3.connect(home / "store.sqlite").execute(
            f"SELECT DISTINCT typeof({column}) FROM {table}")}  # fmt: skip
        plain = {typeof for (typeof,) in sqlite3.connect(control / "store.sqlite").execute(
            f"SELECT DISTINCT typeof({column}) FROM {table}")}  # fmt: skip
        assert kinds <= {"blob", "null"}, (table, column, kinds)
        assert "blob" not in plain, (table, column, plain)
        if f"{table}.{column}" in FILLED:  # the example data has values there
            assert "blob" in kinds and plain - {"null"}, (table, column)


def test_the_features_of_an_encrypted_home_are_those_of_the_same_data_in_clear(
    sealed: tuple[Path, Path], planted: Path, tmp_path: Path
) -> None:
    home, key = sealed
    control = ingested_home(tmp_path, planted, None)
    spec = load_study(STUDY_FILE).model_copy(  # age reads the sealed birth year
        update={"demographics": ["age", "sex"], "reference_date": date(2020, 1, 1)}
    )
    with Node.open(home, at_rest_key=AtRestKey.from_file(key)) as node:
        mine = raw_matrix(node.store, spec)
    with Node.open(control) as node:
        theirs = raw_matrix(node.store, spec)

    assert mine.ids == theirs.ids and len(mine.ids) > 100
    assert np.array_equal(mine.x, theirs.x, equal_nan=True)
    assert not np.isnan(mine.x[:, -2]).all()  # the ages are there
    assert np.array_equal(mine.y, theirs.y) and mine.excluded == theirs.excluded


def test_an_encrypted_home_works_with_its_key(sealed: tuple[Path, Path]) -> None:
    home, key = sealed
    with Node.open(home, at_rest_key=AtRestKey.from_file(key)) as node:
        assert node.status()["patients"] > 100
        matrix = node.extract(load_study(STUDY_FILE))
        assert matrix.patients > 100
        conn = node.store.conn
        rtype, rid, value = conn.execute(
            "SELECT type, id, json FROM resources WHERE id = 'planted-0001'"
        ).fetchone()
        assert json.loads(node.store.resource_json(value, rtype, rid))["name"][0]["family"] == NAME


def test_opening_an_encrypted_home_without_its_key_is_one_clear_error(
    sealed: tuple[Path, Path],
) -> None:
    home, key = sealed

    line = assert_user_error(invoke("node", "status", "--home", home), 7)

    assert f"encrypted at rest (key id {key_id(key)})" in line
    assert "AIPIPE_AT_REST_KEY_FILE" in line


def test_a_wrong_key_is_refused_naming_both_key_ids(
    sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    home, key = sealed
    wrong = make_key(tmp_path / "wrong.key")

    result = invoke("node", "--at-rest-key-file", wrong, "status", "--home", home)

    line = assert_user_error(result, 7)
    assert key_id(key) in line and key_id(wrong) in line


def test_a_key_file_others_can_read_is_refused(sealed: tuple[Path, Path], tmp_path: Path) -> None:
    home, key = sealed
    loose = tmp_path / "loose.key"
    loose.write_bytes(key.read_bytes())
    loose.chmod(0o644)

    result = invoke("node", "--at-rest-key-file", loose, "status", "--home", home)

    assert "readable by others (mode 644); run: chmod 600" in assert_user_error(result, 7)


def test_the_key_can_come_from_the_environment(
    sealed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, key = sealed
    monkeypatch.setenv("AIPIPE_AT_REST_KEY", key.read_text())

    result = invoke("node", "status", "--home", home, "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["patients"] > 100


def test_a_sealed_file_swapped_or_altered_is_refused(
    sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    home, key = sealed
    copy = copied(home, tmp_path / "copy")
    (copy / "identity.key").write_bytes((copy / "sealing.key").read_bytes())

    result = invoke("--at-rest-key-file", key, "audit", "verify", "--home", copy)

    line = assert_user_error(result, 7)
    assert "sealed for 'file:sealing.key', not for 'file:identity.key'" in line


def test_a_node_home_without_a_key_stays_plain(planted: Path, tmp_path: Path) -> None:
    home = ingested_home(tmp_path, planted, None)

    assert load_node_config(home).config.at_rest is None
    value = sqlite3.connect(home / "store.sqlite").execute("SELECT json FROM resources").fetchone()
    assert isinstance(value[0], str)  # text, as before


# -- the hub home ----------------------------------------------------------------------------


def test_a_hub_model_blob_is_no_safetensors_without_the_key(tmp_path: Path) -> None:
    key = make_key(tmp_path / "hub.key")
    made = invoke("hub", "init", "--home", tmp_path / "hub", "--at-rest-key-file", key, "--json")
    assert made.exit_code == 0, made.output
    weights = {"w": np.arange(6, dtype=np.float32)}
    store = load_hub(tmp_path / "hub", AtRestKey.from_file(key)).open_store()
    try:
        digest = store.put_blob(encode_arrays(weights))
        assert np.array_equal(decode_arrays(store.blob(digest))["w"], weights["w"])
    finally:
        store.close()

    raw = (tmp_path / "hub" / "blobs" / digest[:2] / digest).read_bytes()
    with pytest.raises(TensorDecodeError):
        decode_arrays(raw)
    assert raw.startswith(MAGIC)
    for name in ("identity.key", "ca-key.pem", "tls-key.pem"):
        assert (tmp_path / "hub" / name).read_bytes().startswith(MAGIC), name
    rotated = invoke("hub", "--at-rest-key-file", key, "tls", "rotate", "--home", tmp_path / "hub")
    assert rotated.exit_code == 0, rotated.output  # the sealed CA key signs the new certificate
    assert (tmp_path / "hub" / "tls-key.pem").read_bytes().startswith(MAGIC)
    assert load_hub(tmp_path / "hub", AtRestKey.from_file(key)).tls() is not None  # it loads
    line = assert_user_error(invoke("hub", "nodes", "--home", tmp_path / "hub"), 7)
    assert f"hub home {tmp_path / 'hub'} is encrypted at rest (key id {key_id(key)})" in line


# -- backup and rotation ---------------------------------------------------------------------


def test_an_encrypted_home_backs_up_and_restores_with_its_key(
    sealed: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, key = sealed
    monkeypatch.setenv("AIPIPE_AT_REST_KEY_FILE", str(key))
    archive, restored = tmp_path / "node.tar.gz", tmp_path / "restored"
    assert invoke("node", "backup", "--home", home, "--out", archive).exit_code == 0
    result = invoke("node", "restore", "--home", restored, "--from", archive)
    assert result.exit_code == 0, result.output

    status = invoke("node", "status", "--home", restored, "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["patients"] > 100
    assert found(restored, NAME.encode()) == []
    monkeypatch.delenv("AIPIPE_AT_REST_KEY_FILE")
    assert_user_error(invoke("node", "status", "--home", restored), 7)


def resources(home: Path, key: Path) -> list[tuple[str, str, str]]:
    with Node.open(home, at_rest_key=AtRestKey.from_file(key)) as node:
        rows = node.store.conn.execute("SELECT type, id, json FROM resources ORDER BY 1, 2")
        return [(t, i, node.store.resource_json(v, t, i)) for t, i, v in rows]


def copied(home: Path, to: Path) -> Path:
    shutil.copytree(home, to)  # copy2: modes kept
    return to


def test_rekey_seals_everything_under_the_new_key_and_refuses_the_old(
    sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    home, old = copied(sealed[0], tmp_path / "home"), sealed[1]
    new = make_key(tmp_path / "new.key")
    before = resources(home, old)

    result = invoke("node", "--at-rest-key-file", old, "rekey", "--home", home,
                    "--new-key-file", new, "--json")  # fmt: skip

    assert result.exit_code == 0, result.output
    done = json.loads(result.stdout)
    assert done["new_key_id"] == key_id(new) and done["files"] >= 3 and done["rows"] > 100
    line = assert_user_error(invoke("node", "--at-rest-key-file", old, "status", "--home", home), 7)
    assert key_id(new) in line and key_id(old) in line
    assert resources(home, new) == before
    assert found(home, NAME.encode()) == []
    with AuditLog.open(home / "audit.sqlite", None) as log:
        [event] = [e for e in log.events() if e.action == "node.rekey"]
    assert event.details["from"] == key_id(old) and event.details["to"] == key_id(new)
    verified = invoke("--at-rest-key-file", new, "audit", "verify", "--home", home)
    assert verified.exit_code == 0, verified.output
    sealed_under = {p.read_bytes()[len(MAGIC) : len(MAGIC) + 8].hex()
                    for p in every_file(home) if p.read_bytes().startswith(MAGIC)}  # fmt: skip
    assert sealed_under == {key_id(new)}  # nothing left under the old key


def test_a_rotation_cut_short_is_refused_until_a_rerun_finishes_it(
    sealed: tuple[Path, Path], tmp_path: Path
) -> None:
    home, old = copied(sealed[0], tmp_path / "home"), sealed[1]
    new = make_key(tmp_path / "new.key")
    before = resources(home, old)
    paths = load_node_config(home)

    def save(setting: object) -> None:
        paths.config.at_rest = setting  # type: ignore[assignment]
        save_node_config(home, paths.config)

    def crash(at_rest: AtRest, skipped: list[Path]) -> tuple[int, int]:
        reseal_files(home, at_rest, skipped)  # the files are done, the store's rows are not
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rotate("node", paths.config.at_rest, AtRestKey.from_file(old), AtRestKey.from_file(new),
               save=save, reseal=crash)  # fmt: skip

    for key in (old, new):
        line = assert_user_error(
            invoke("node", "--at-rest-key-file", key, "status", "--home", home), 7
        )
        assert "rotation did not finish" in line
    rerun = invoke("node", "--at-rest-key-file", old, "rekey", "--home", home,
                   "--new-key-file", new, "--json")  # fmt: skip
    assert rerun.exit_code == 0, rerun.output
    assert json.loads(rerun.stdout)["files"] == 0  # the files were already done
    assert resources(home, new) == before


def test_hub_rekey_seals_the_blobs_again_and_refuses_the_old_key(tmp_path: Path) -> None:
    old, new, home = make_key(tmp_path / "old.key"), make_key(tmp_path / "new.key"), tmp_path / "h"
    assert invoke("hub", "init", "--home", home, "--at-rest-key-file", old).exit_code == 0
    store = load_hub(home, AtRestKey.from_file(old)).open_store()
    try:
        digest = store.put_blob(encode_arrays({"w": np.ones(3, dtype=np.float32)}))
    finally:
        store.close()

    result = invoke("hub", "--at-rest-key-file", old, "rekey", "--home", home,
                    "--new-key-file", new, "--json")  # fmt: skip

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files"] == 4  # identity, CA and TLS keys, and the blob
    assert key_id(old) in assert_user_error(invoke("hub", "--at-rest-key-file", old, "nodes",
                                                   "--home", home), 7)  # fmt: skip
    store = load_hub(home, AtRestKey.from_file(new)).open_store()
    try:
        assert decode_arrays(store.blob(digest))["w"].tolist() == [1.0, 1.0, 1.0]
    finally:
        store.close()


# -- deployment ------------------------------------------------------------------------------


def test_every_k8s_container_takes_the_at_rest_key_from_a_secret_and_init_seals_the_home(
    tmp_path: Path,
) -> None:
    for name, secret in (("aipipe-hub", "aipipe-hub-at-rest"),
                         ("aipipe-node-a", "aipipe-node-a-at-rest")):  # fmt: skip
        spec = pod_spec(name)
        for container in spec["initContainers"] + spec["containers"]:
            [env] = [e for e in container["env"] if e["name"] == "AIPIPE_AT_REST_KEY"]
            assert env["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "key"}, name
    key = AtRestKey.generate()
    key.write(tmp_path / "k")
    [init] = pod_spec("aipipe-hub")["initContainers"]
    made = run_script(init["args"][0], tmp_path, AIPIPE_AT_REST_KEY=(tmp_path / "k").read_text())
    assert made.returncode == 0, made.stderr
    config = load_hub(tmp_path / "volume" / "hub", key).config
    assert config.at_rest is not None and config.at_rest.key_id == key.key_id


def test_every_compose_service_with_a_home_reads_its_at_rest_key_from_a_secret() -> None:
    data = compose()
    for name, service in data["services"].items():
        path = service.get("environment", {}).get("AIPIPE_AT_REST_KEY_FILE")
        assert path is not None, name
        secret = path.removeprefix("/run/secrets/")
        assert secret in service["secrets"] and secret in data["secrets"], name


def test_rekey_leaves_a_replaced_home_under_its_own_key_alone_and_says_so(tmp_path: Path) -> None:
    first, second, third = (make_key(tmp_path / f"{n}.key") for n in ("a", "b", "c"))
    home = tmp_path / "home"
    assert invoke("node", "init", "--home", home, "--name", "basel",
                  "--at-rest-key-file", first).exit_code == 0  # fmt: skip
    again = invoke("node", "init", "--home", home, "--name", "basel", "--force",
                   "--at-rest-key-file", second)  # fmt: skip
    assert again.exit_code == 0, again.output

    result = invoke("node", "--at-rest-key-file", second, "rekey", "--home", home,
                    "--new-key-file", third, "--json")  # fmt: skip

    assert result.exit_code == 0, result.output
    skipped = json.loads(result.stdout)["skipped"]
    assert skipped and all(".replaced-" in path for path in skipped)
    assert {Path(p).name for p in skipped} >= {"identity.key", "pseudonym.key", "sealing.key"}
    status = invoke("node", "--at-rest-key-file", third, "status", "--home", home)
    assert status.exit_code == 0, status.output


def test_the_vault_seals_its_key_contributions_and_secagg_round_states(tmp_path: Path) -> None:
    at_rest = AtRest(AtRestKey.generate())
    SecureVault.create_sealing_key(tmp_path / "sealing.key", at_rest=at_rest)
    vault = SecureVault(tmp_path / "sealing.key", tmp_path / "secure", at_rest=at_rest)
    sent = vault.record_sent("chd", 3, np.arange(4.0))
    states = RoundStates(vault)
    item = RoundWork(kind="train", study="chd", study_digest="d" * 64, round=3, version="v")
    states.save(SecAggRoundState(item=item, sent={"advert": b"hello"}))

    path = states.path("chd", 3)
    for file in (tmp_path / "sealing.key", sent, path):
        assert file.read_bytes().startswith(MAGIC), file
    assert states.load(path).sent == {"advert": b"hello"}  # the tmp file's name did not matter
    assert len(vault.sealing_public()) == 32
    with pytest.raises(AtRestKeyError):
        RoundStates(SecureVault(tmp_path / "sealing.key", tmp_path / "secure")).load(path)


def test_a_persons_totp_secret_is_sealed_and_still_logs_them_in_after_a_rekey(
    tmp_path: Path,
) -> None:
    old, new, home = make_key(tmp_path / "old.key"), make_key(tmp_path / "new.key"), tmp_path / "h"
    assert invoke("hub", "init", "--home", home, "--at-rest-key-file", old).exit_code == 0
    added = invoke("hub", "--at-rest-key-file", old, "user", "add", "alice", "--role", "auditor",
                   "--home", home, "--json")  # fmt: skip
    assert added.exit_code == 0, added.output
    person = json.loads(added.stdout)
    secret = pyotp.parse_uri(person["totp_uri"]).secret
    assert found(home, secret.encode()) == []  # not in hub.sqlite (nor anywhere) in clear

    rekeyed = invoke("hub", "--at-rest-key-file", old, "rekey", "--home", home,
                     "--new-key-file", new)  # fmt: skip
    assert rekeyed.exit_code == 0, rekeyed.output

    with Hub.open(home, at_rest_key=AtRestKey.from_file(new)) as hub:
        code = pyotp.TOTP(secret).now()
        request = TokenRequest(person="alice", password=person["password"], totp=code)
        grant = anyio.run(hub.people.login, request, "test")
    assert grant.role == "auditor"


def test_the_weights_pending_personalization_are_sealed(tmp_path: Path) -> None:
    key = make_key(tmp_path / "k")
    weights = encode_arrays({"head.weight": np.full((1, 3), 0.25, dtype=np.float32)})
    with Node.init(tmp_path / "n", "basel", at_rest_key=AtRestKey.from_file(key)) as node:
        PendingPersonal(node.store).put(Pending("chd", None, 1, "v" * 64, weights))
        assert PendingPersonal(node.store).all()[0].weights == weights
    [(raw,)] = sqlite3.connect(tmp_path / "n" / "store.sqlite").execute(
        "SELECT weights FROM personal_pending"
    )
    assert raw.startswith(MAGIC) and weights not in raw
