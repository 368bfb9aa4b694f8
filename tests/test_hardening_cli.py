"""Operator errors that ended in a traceback or a wrong exit code (issue 9, item 20), each
through Typer's CliRunner: an exit code and one `error:` line, no traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aipipe.cli import model as model_cli
from aipipe.node.client import HubClient
from tests.cli_support import assert_user_error, invoke
from tests.hub_support import STUDY, Hub, running_hub

# -- node ingest of input that is all rejected ------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    assert invoke("node", "init", "--home", home, "--name", "n1").exit_code == 0
    return home


def test_an_ingest_that_rejects_everything_exits_non_zero_and_names_the_file(
    node: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.ndjson"
    bad.write_text("{oops\n{also broken\n", encoding="utf-8")

    result = invoke("node", "ingest", "--home", node, bad)

    line = assert_user_error(result, exit_code=4)
    assert "broken.ndjson" in line and "rejected all 2" in line
    assert "invalid JSON line" in result.stdout  # the report still says why


def test_an_ingest_that_stores_something_still_exits_zero_and_names_the_rejected_file(
    node: Path, tmp_path: Path
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.ndjson").write_text("{oops\n", encoding="utf-8")
    good = json.dumps({"resourceType": "Patient", "id": "p1"})
    (tmp_path / "data" / "good.ndjson").write_text(good + "\n", encoding="utf-8")

    result = invoke("node", "ingest", "--home", node, tmp_path / "data")

    assert result.exit_code == 0, result.output
    assert "bad.ndjson" in result.stderr and "good.ndjson" not in result.stderr


# -- hub URL without a scheme -----------------------------------------------------------


def test_a_hub_url_without_a_scheme_is_reported_as_such(tmp_path: Path) -> None:
    result = invoke("model", "list", "--hub", "localhost:8000", "--token", "t")

    line = assert_user_error(result, exit_code=2)
    assert "http:// or https://" in line and "localhost:8000" in line
    assert "running" not in line


# -- model show / export with the ids the tables print ----------------------------------


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    """A real hub app in-process; the CLI's client reaches it through its ASGI transport."""
    with running_hub(tmp_path / "hub") as running:

        def client(url: str, token: str) -> HubClient:
            return HubClient(url, token=token, transport=running.client._transport)

        monkeypatch.setattr(model_cli, "client", client)
        yield running


def model_args(hub: Hub) -> list[str]:
    return ["--hub", "http://testserver", "--token", hub.admin_token]


def published_version(hub: Hub, name: str = "hub-test") -> str:
    study = hub.publish({**STUDY, "name": name})
    version: str = study["current_version"]
    return version


def test_model_show_accepts_the_12_character_id_that_tables_print(hub: Hub) -> None:
    version = published_version(hub)

    result = invoke("model", "show", version[:12], "--json", *model_args(hub))

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] == version


def test_model_export_accepts_a_prefix_and_creates_the_output_directory(
    hub: Hub, tmp_path: Path
) -> None:
    version = published_version(hub)
    out = tmp_path / "missing" / "deeper" / "model"

    result = invoke("model", "export", version[:12], "--out", out, *model_args(hub))

    assert result.exit_code == 0, result.output
    assert out.with_suffix(".safetensors").stat().st_size > 0
    assert json.loads(out.with_suffix(".json").read_text())["version"] == version


def test_model_show_of_an_unknown_prefix_is_a_one_line_error(hub: Hub) -> None:
    published_version(hub)

    result = invoke("model", "show", "0123456789ab", *model_args(hub))

    line = assert_user_error(result, exit_code=12)
    assert "0123456789ab" in line and "aipipe model list" in line


def test_model_show_of_an_ambiguous_prefix_is_a_one_line_error(hub: Hub) -> None:
    versions = [published_version(hub, f"study-{i}") for i in range(40)]
    first = {v[0] for v in versions}
    prefix = next(c for c in sorted(first) if sum(v.startswith(c) for v in versions) > 1)

    result = invoke("model", "show", prefix, *model_args(hub))

    line = assert_user_error(result, exit_code=2)
    assert "ambiguous" in line and prefix in line


# -- study files the parser cannot read -------------------------------------------------


def write_study(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def test_a_study_with_a_yaml_syntax_error_is_one_line_naming_line_and_column(
    tmp_path: Path,
) -> None:
    study = tmp_path / "study.yaml"
    study.write_text("name: broken\ncohort:\n  label: [unclosed\nfeatures: []\n", encoding="utf-8")

    result = invoke("study", "validate", study)

    line = assert_user_error(result, exit_code=3)
    assert "study.yaml" in line and "line " in line and "column " in line


def test_a_study_saved_in_latin_1_is_one_clear_line(tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    text = yaml.safe_dump({**STUDY, "description": "Études cliniques"}, allow_unicode=True)
    study.write_bytes(text.encode("latin-1"))

    result = invoke("study", "validate", study)

    line = assert_user_error(result, exit_code=3)
    assert "UTF-8" in line and "study.yaml" in line


def test_model_export_into_a_missing_directory_creates_it(hub: Hub, tmp_path: Path) -> None:
    version = published_version(hub)
    out = tmp_path / "exports" / "model"

    result = invoke("model", "export", version, "--out", out, *model_args(hub))

    assert result.exit_code == 0, result.output
    assert out.with_suffix(".safetensors").is_file()
