"""The `aipipe` command line through Typer's CliRunner (aipipe.cli)."""

from __future__ import annotations

import json
import shutil
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from aipipe import __version__
from aipipe.cli import render
from aipipe.node import home as node_home
from aipipe.study.spec import load_study
from tests.cli_support import assert_user_error, invoke

BUNDLES = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "synthea_fhir_r4" / "bundles"
)
needs_synthea = pytest.mark.skipif(not BUNDLES.is_dir(), reason=f"Synthea data missing: {BUNDLES}")

STUDY = {
    "name": "cli-test",
    "cohort": {"label": {"conditions": ["snomed|44054006"]}},
    "features": [
        {"name": "bmi", "concept": "bmi", "missing": "impute"},
        {"name": "glucose", "concept": "glucose", "missing": "indicator"},
    ],
    "demographics": ["sex"],
    "split": {"test_fraction": 0.34, "seed": 43, "stratify": False},
}


@pytest.fixture
def node(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    result = invoke("node", "init", "--home", home, "--name", "cleveland")
    assert result.exit_code == 0, result.output
    return home


@pytest.fixture
def bundles(tmp_path: Path) -> Path:
    """The three smallest Synthea bundles, copied into a folder of their own."""
    if not BUNDLES.is_dir():
        pytest.skip(f"Synthea data missing: {BUNDLES}")
    folder = tmp_path / "bundles"
    folder.mkdir()
    for path in sorted(BUNDLES.glob("*.json"), key=lambda p: p.stat().st_size)[:3]:
        shutil.copy(path, folder / path.name)
    return folder


def entries_in(folder: Path) -> int:
    return sum(
        len(json.loads(path.read_text(encoding="utf-8"))["entry"]) for path in folder.glob("*.json")
    )


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY), encoding="utf-8")
    return path


# -- root ---------------------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    result = invoke("--version")

    assert result.exit_code == 0
    assert result.stdout.strip() == f"aipipe {__version__}"


# -- node init ----------------------------------------------------------------------------


def test_node_init_creates_the_node_files(node: Path) -> None:
    names = {path.name for path in node.iterdir()}

    assert {"node.yaml", "store.sqlite", "identity.key", "pseudonym.key"} <= names
    assert yaml.safe_load((node / "node.yaml").read_text(encoding="utf-8"))["name"] == "cleveland"


@pytest.mark.parametrize("key", ["identity.key", "pseudonym.key"])
def test_node_init_writes_keys_readable_by_the_owner_only(node: Path, key: str) -> None:
    mode = stat.S_IMODE((node / key).stat().st_mode)

    assert mode == 0o600


def test_node_init_json_names_the_files_it_created(tmp_path: Path) -> None:
    home = tmp_path / "node"

    result = invoke("node", "init", "--home", home, "--name", "basel", "--json")

    info = json.loads(result.stdout)
    assert info["name"] == "basel"
    assert Path(info["identity_key"]) == home / "identity.key"
    assert Path(info["store"]).is_file()


def test_a_second_init_without_force_is_refused_and_changes_nothing(node: Path) -> None:
    key_before = (node / "identity.key").read_bytes()

    result = invoke("node", "init", "--home", node, "--name", "cleveland")

    line = assert_user_error(result, exit_code=2)
    assert "a node already exists" in line and "--force" in line
    assert (node / "identity.key").read_bytes() == key_before


def test_init_with_force_moves_the_old_node_aside(node: Path) -> None:
    key_before = (node / "identity.key").read_bytes()

    result = invoke("node", "init", "--home", node, "--name", "cleveland", "--force")

    assert result.exit_code == 0, result.output
    (backup,) = node.glob(".replaced-*")
    assert (backup / "identity.key").read_bytes() == key_before
    assert {"node.yaml", "store.sqlite", "pseudonym.key"} <= {p.name for p in backup.iterdir()}
    assert (node / "identity.key").read_bytes() != key_before


def test_two_forced_inits_within_one_second_keep_both_old_nodes(
    node: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> FrozenClock:
            return cls(2024, 1, 2, 3, 4, 5, tzinfo=tz)

    monkeypatch.setattr(node_home, "datetime", FrozenClock)
    node_home.init_node(node, "cleveland", force=True)

    node_home.init_node(node, "cleveland", force=True)

    assert len(list(node.glob(".replaced-*"))) == 2


# -- node ingest and status ---------------------------------------------------------------


def table_rows(text: str) -> dict[str, list[str]]:
    """The body rows of the rich tables in `text`, keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_node_ingest_prints_a_table_per_resource_type(node: Path, bundles: Path) -> None:
    result = invoke("node", "ingest", "--home", node, bundles)

    assert result.exit_code == 0, result.output
    assert "ingest from files" in result.stdout
    header = next(line for line in result.stdout.splitlines() if "stored" in line)
    assert header.split() == [
        "┃", "type", "┃", "read", "┃", "stored", "┃", "updated", "┃", "unchanged", "┃",
        "stale", "┃", "rejected", "┃",
    ]  # fmt: skip
    assert table_rows(result.stdout)["Patient"] == ["3", "3", "0", "0", "0", "0"]


def test_node_ingest_json_gives_the_totals(node: Path, bundles: Path) -> None:
    result = invoke("node", "ingest", "--home", node, bundles, "--json")

    report = json.loads(result.stdout)
    entries = entries_in(bundles)
    assert report["files"] == 3
    assert report["totals"]["read"] == entries
    assert report["totals"]["stored"] + report["totals"]["unchanged"] == entries
    assert report["totals"]["rejected"] == 0
    assert report["types"]["Patient"]["stored"] == 3


def test_a_second_ingest_reports_everything_unchanged(node: Path, bundles: Path) -> None:
    invoke("node", "ingest", "--home", node, bundles, "--json")

    result = invoke("node", "ingest", "--home", node, bundles, "--json")

    totals = json.loads(result.stdout)["totals"]
    assert totals["unchanged"] == totals["read"] == entries_in(bundles)


def test_node_status_json_counts_what_was_ingested(node: Path, bundles: Path) -> None:
    invoke("node", "ingest", "--home", node, bundles, "--json")

    result = invoke("node", "status", "--home", node, "--json")

    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["name"], info["patients"], info["resources"]["Patient"]) == ("cleveland", 3, 3)
    assert sum(info["resources"].values()) <= entries_in(bundles)
    assert info["last_sync"] is not None


def test_node_status_of_an_empty_node_says_it_never_synced(node: Path) -> None:
    result = invoke("node", "status", "--home", node)

    assert result.exit_code == 0, result.output
    assert "never" in result.stdout


def test_ingest_of_a_missing_path_is_a_red_one_line_error(
    node: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    colour = Console(stderr=True, force_terminal=True, color_system="standard", highlight=False)
    monkeypatch.setattr(render, "err_console", colour)

    result = invoke("node", "ingest", "--home", node, tmp_path / "nowhere")

    assert result.exit_code == 4
    assert isinstance(result.exception, SystemExit)
    assert "\x1b[1;31merror:" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "no such file or directory" in result.stderr


def test_ingest_of_a_missing_path_names_it(node: Path, tmp_path: Path) -> None:
    result = invoke("node", "ingest", "--home", node, tmp_path / "nowhere")

    line = assert_user_error(result, exit_code=4)
    assert "nowhere" in line


def test_ingest_with_neither_paths_nor_a_server_is_refused(node: Path) -> None:
    result = invoke("node", "ingest", "--home", node)

    line = assert_user_error(result, exit_code=2)
    assert "give either files/directories or --fhir-url" in line


def test_ingest_with_both_paths_and_a_server_is_refused(node: Path, tmp_path: Path) -> None:
    result = invoke("node", "ingest", "--home", node, tmp_path, "--fhir-url", "http://x/fhir")

    assert_user_error(result, exit_code=2)


@pytest.mark.parametrize(
    "command",
    [
        ["node", "status"],
        ["node", "ingest", "."],
        ["study", "features", "STUDY"],
    ],
    ids=["status", "ingest", "features"],
)
def test_a_command_on_a_home_without_a_node_says_to_run_node_init(
    tmp_path: Path, study_file: Path, command: list[str]
) -> None:
    args = [study_file if arg == "STUDY" else arg for arg in command]

    result = invoke(*args, "--home", tmp_path / "nothing")

    line = assert_user_error(result, exit_code=2)
    assert "aipipe node init" in line


# -- study --------------------------------------------------------------------------------


def test_study_validate_accepts_a_valid_study(study_file: Path) -> None:
    result = invoke("study", "validate", study_file)

    assert result.exit_code == 0, result.output
    assert "is a valid study" in " ".join(result.stdout.split())


def test_study_validate_json_gives_the_digest_and_columns(study_file: Path) -> None:
    result = invoke("study", "validate", study_file, "--json")

    summary = json.loads(result.stdout)
    spec = load_study(study_file)
    assert summary["valid"] is True
    assert summary["digest"] == spec.digest()
    assert summary["columns"] == ["bmi", "glucose", "glucose_missing", "sex"]


def test_study_validate_refuses_a_bad_study_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**STUDY, "features": [{"name": "x", "concept": "nope"}]}))

    result = invoke("study", "validate", bad)

    line = assert_user_error(result, exit_code=3)
    assert "unknown concept 'nope'" in line


def test_study_validate_of_a_missing_file_is_an_error(tmp_path: Path) -> None:
    result = invoke("study", "validate", tmp_path / "absent.yaml")

    line = assert_user_error(result, exit_code=3)
    assert "cannot read study file" in line


def test_study_features_json_summarises_the_matrix(
    node: Path, bundles: Path, study_file: Path
) -> None:
    invoke("node", "ingest", "--home", node, bundles, "--json")

    result = invoke("study", "features", study_file, "--home", node, "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {"cohort", "train", "test", "prevalence", "features", "missing"} <= set(summary)
    assert summary["cohort"] == summary["train"] + summary["test"] == 3
    assert summary["features"] == ["bmi", "glucose", "glucose_missing", "sex"]
    assert set(summary["missing"]) == {"bmi", "glucose", "sex"}


def test_study_features_prints_cohort_and_missingness(
    node: Path, bundles: Path, study_file: Path
) -> None:
    invoke("node", "ingest", "--home", node, bundles, "--json")

    result = invoke("study", "features", study_file, "--home", node)

    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "cohort" in text and "missing per feature" in text


def test_study_features_on_an_empty_node_says_to_ingest_first(node: Path, study_file: Path) -> None:
    result = invoke("study", "features", study_file, "--home", node)

    line = assert_user_error(result, exit_code=3)
    assert "aipipe node ingest" in line
