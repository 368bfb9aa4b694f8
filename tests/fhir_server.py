"""A real FHIR R4 server for end-to-end tests: sekmet-fhir, in its own venv, on 127.0.0.1.

`tests/conftest.py` re-exports the session fixture (`from tests.fhir_server import fhir_server`).
Tests that need an empty server of their own (exact counts) use `start_fhir_server` directly.

sekmet-fhir pins dependencies (fhir.resources, lxml, faker…) that aipipe does not need, so it
lives in `<repo>/.cache/sekmet-venv`, built once and reused while its marker names the pinned
version. The server is launched as `python -m uvicorn sekmet.main:app_factory --factory --fd N`
on a socket this process bound to port 0: sekmet writes its configured `base_url` into paging
`next` links, so the port must be known before the server starts, and handing over the bound
socket leaves no window for another process to take the port.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

SEKMET_VERSION = "0.1.1"
REPO = Path(__file__).resolve().parents[1]
SEKMET_VENV = REPO / ".cache" / "sekmet-venv"
VERSION_MARKER = SEKMET_VENV / "aipipe-sekmet-version"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
FHIR_JSON = "application/fhir+json"


@dataclass
class FhirTestServer:
    """A running sekmet server: its FHIR base URL and helpers to load data the way an EHR would."""

    base_url: str
    client: httpx.Client

    def post_bundle(self, bundle: Path | str | dict[str, Any]) -> dict[str, Any]:
        """POST a transaction (or batch) Bundle to the base URL; return the response Bundle."""
        body = bundle if isinstance(bundle, dict) else json.loads(Path(bundle).read_bytes())
        return self._send("POST", self.base_url, body)

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Update (or create with its id) one resource; return it as stored (new meta)."""
        url = f"{self.base_url}/{resource['resourceType']}/{resource['id']}"
        return self._send("PUT", url, resource)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        response = self.client.get(f"{self.base_url}/{path}", params=params)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def _send(self, method: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.request(
            method, url, content=json.dumps(body), headers={"Content-Type": FHIR_JSON}
        )
        if response.status_code >= 400:
            raise AssertionError(
                f"{method} {url} answered {response.status_code}: {response.text[:2000]}"
            )
        result: dict[str, Any] = response.json()
        return result


def sekmet_python() -> Path:
    """The sekmet venv's interpreter, building the venv first when it is missing or stale."""
    SEKMET_VENV.parent.mkdir(parents=True, exist_ok=True)
    python = SEKMET_VENV / "bin" / "python"
    # Several people may run the e2e tests in this tree at once: build under an exclusive lock.
    with open(SEKMET_VENV.parent / "sekmet-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _venv_is_usable(python):
            _build_venv(python)
    return python


def _venv_is_usable(python: Path) -> bool:
    if not python.exists() or not VERSION_MARKER.exists():
        return False
    if VERSION_MARKER.read_text(encoding="utf-8").strip() != SEKMET_VERSION:
        return False
    probe = subprocess.run(
        [str(python), "-c", "import sekmet.main, uvicorn"], capture_output=True, check=False
    )
    return probe.returncode == 0


def _build_venv(python: Path) -> None:
    shutil.rmtree(SEKMET_VENV, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(SEKMET_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", f"sekmet-fhir=={SEKMET_VERSION}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.fail(
                f"could not build the sekmet venv ({' '.join(step)} exited {done.returncode}):\n"
                f"{done.stderr[-3000:]}"
            )
    VERSION_MARKER.write_text(SEKMET_VERSION + "\n", encoding="utf-8")


def _write_settings(workdir: Path, port: int, server_auth: dict[str, Any]) -> Path:
    base_url = f"http://127.0.0.1:{port}/fhir"
    settings = {
        "base_url": base_url,
        "host": "127.0.0.1",
        "port": port,
        "data_dir": str(workdir / "data"),
        "db_path": str(workdir / "data" / "sekmet.db"),
        "own_private_key_path": str(workdir / "keys" / "sekmet_private.pem"),
        "server_auth": server_auth,
        # the simulator answers MedicationRequests, Claims… with writes of its own, which would
        # change the counts and cursors under test
        "simulator": {"enabled": False},
        # sekmet otherwise stores every request and response body in its traffic table
        "log_inbound": False,
    }
    path = workdir / "settings.yaml"
    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


# sekmet 0.1.1 has no RiskAssessment search parameters (DESIGN §11): register identifier,
# subject and patient before the app starts, so conditional updates by identifier work.
_LAUNCHER = """
import sys
from sekmet.fhir import search_params as sp
sp.PARAMS["RiskAssessment"] = {
    "identifier": sp.SearchParam("identifier", "token", ("identifier",)),
    "subject": sp.SearchParam("subject", "reference", ("subject",)),
    "patient": sp.SearchParam("patient", "reference", ("subject",), "Patient"),
}
import uvicorn.main
sys.argv = ["uvicorn", *sys.argv[1:]]
uvicorn.main.main()
"""


def _launch(
    python: Path, workdir: Path, server_auth: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], str]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    settings = _write_settings(workdir, port, server_auth)
    fd = listener.fileno()
    command = [str(python), "-c", _LAUNCHER, "sekmet.main:app_factory", "--factory"]
    command += ["--fd", str(fd), "--log-level", "warning", "--no-access-log"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    env["SEKMET_CONFIG"] = str(settings)
    with open(workdir / "server.log", "wb") as log:
        process = subprocess.Popen(
            command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, pass_fds=(fd,)
        )
    listener.close()  # the child holds its own copy of the listening socket
    return process, f"http://127.0.0.1:{port}/fhir"


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    started = time.monotonic()
    while time.monotonic() - started < READY_TIMEOUT_S and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/metadata", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # poll interval, not a wait for readiness
    waited = time.monotonic() - started
    state = "not ready" if process.poll() is None else f"exited with {process.returncode}"
    output = log.read_text(encoding="utf-8", errors="replace")[-4000:]
    _stop(process)
    pytest.fail(f"sekmet at {base_url} {state} after {waited:.1f} s; its output:\n{output}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def start_fhir_server(
    workdir: Path, server_auth: dict[str, Any] | None = None
) -> Iterator[FhirTestServer]:
    """Run an empty sekmet server with its files under `workdir`; stop it on exit.

    `server_auth` is sekmet's `server_auth` setting; the default accepts unauthenticated
    requests. SMART Backend Services: `{"types": ["smart"], "smart_clients": [{"client_id":
    "aipipe", "jwks": {"keys": [...]}, "scopes": "system/*.read"}]}`; the token endpoint is
    `<base_url without /fhir>/auth/token`. The helpers' own client then needs a token too.
    """
    python = sekmet_python()
    process, base_url = _launch(python, workdir, server_auth or {"types": ["none"]})
    try:
        _wait_ready(process, base_url, workdir / "server.log")
        with httpx.Client(timeout=60.0, headers={"Accept": FHIR_JSON}) as client:
            yield FhirTestServer(base_url=base_url, client=client)
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def fhir_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FhirTestServer]:
    """One sekmet server for the whole session; tests share its data, so load what you need."""
    with start_fhir_server(tmp_path_factory.mktemp("sekmet")) as server:
        yield server
