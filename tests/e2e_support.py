"""Helpers for end-to-end tests with real `aipipe` processes on 127.0.0.1 (no tests in here).

- `aipipe(...)` runs one CLI command as a subprocess (`python -m aipipe`), secrets in its env.
- `ProcessGroup` starts long-running commands (`hub serve`, `node start`), logs each to a file,
  and stops only the processes it started: SIGTERM, then SIGKILL after a grace period.
- `start_hub` / `restart_hub` run `hub serve --port 0` (or the port a killed hub had) and wait
  for `<home>/serve.json` naming the new process plus a 200 from `/healthz`.
- `Federation` sets up a hub and k nodes that enrolled, ingested their hospital's FHIR data and
  approved a small DP study, the way `examples/demo.py` does it through the CLI.
- `signed_update` / `sign` / `frame` build update frames exactly like `aipipe/node/worker.py`,
  so tests can send tampered or replayed ones with a node's real key and credential.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
import numpy.typing as npt
import yaml
from typer.testing import CliRunner, Result

from aipipe.secure.identity import Identity
from aipipe.settings import load_node_config
from aipipe.wire import UpdateHeader, pack_frame
from aipipe.wire.frames import MEDIA_TYPE
from aipipe.wire.tensors import encode_arrays

REPO = Path(__file__).resolve().parents[1]
HEART = REPO / "examples" / "heart-disease"
EXAMPLE_STUDY = HEART / "study.yaml"
SITES = ("hungarian", "switzerland", "va")  # the three smaller hospitals: quick to ingest

READY_TIMEOUT_S = 120.0  # a cold `hub serve` or `node start` imports torch: slow on busy cores
STOP_GRACE_S = 10.0
CLI_TIMEOUT_S = 120.0
POLL_S = 0.1

T = TypeVar("T")


# -- waiting ----------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T | None],
    *,
    what: str,
    timeout_s: float = READY_TIMEOUT_S,
    context: Callable[[], str] = lambda: "",
) -> T:
    """Poll `condition` until it returns something truthy; fail with `context()` if never."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout_s:.0f} s waiting for {what}\n{context()}"
            )
        time.sleep(POLL_S)


def utc_stamp() -> str:
    """Now, in the format the hub stores `last_seen` in (sortable as text)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- the CLI as a subprocess ------------------------------------------------------------------


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any AIPIPE_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPIPE_")}
    env.update(PYTHONUNBUFFERED="1", NO_COLOR="1", COLUMNS="200")
    env.update(extra or {})
    return env


def aipipe(
    *args: str | Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout_s: float = CLI_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m aipipe ARGS` to completion; with `check`, fail the test on a non-zero exit.

    Secrets go in `env`, never in `args` (which end up in error messages and `ps`).
    """
    argv = [str(arg) for arg in args]
    result = subprocess.run(
        [sys.executable, "-m", "aipipe", *argv],
        env=cli_env(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"aipipe {' '.join(argv)} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def aipipe_json(*args: str | Path, env: Mapping[str, str] | None = None) -> Any:
    """Run a command that takes `--json` (pass it) and parse what it printed."""
    return json.loads(aipipe(*args, env=env).stdout)


_runner = CliRunner()


def aipipe_in_process(*args: str | Path) -> Result:
    """Run one CLI command in this process through Typer's runner (the same command code).

    For the commands that import torch (`node approve`, `privacy status`): as a subprocess each
    costs ~4 s of import on two cores, in this process (torch already loaded) ~0.1 s. The
    commands that the tests are about (`hub serve`, `node start`, `train`) always run as real
    processes.
    """
    from aipipe.cli.app import app  # typer app; imported lazily to keep this module light

    result = _runner.invoke(app, [str(arg) for arg in args])
    if result.exit_code != 0:
        raise AssertionError(
            f"aipipe {' '.join(map(str, args))} exited {result.exit_code}\n{result.output}"
        )
    return result


# -- long-running processes -------------------------------------------------------------------


@dataclass
class Started:
    """One process a test started, with its combined stdout/stderr in `log`."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.name} (pid {self.pid}) log ---\n{tail}"

    def send(self, signum: signal.Signals) -> None:
        self.popen.send_signal(signum)

    def pause(self) -> None:
        """SIGSTOP: the process holds still (a node too slow to answer) until `resume`."""
        self.send(signal.SIGSTOP)

    def resume(self) -> None:
        self.send(signal.SIGCONT)

    def kill(self) -> int:
        """SIGKILL, as a crash or an OOM killer would, and reap it."""
        self.send(signal.SIGKILL)
        return self.popen.wait(timeout=STOP_GRACE_S)

    def wait(self, timeout_s: float = CLI_TIMEOUT_S) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{self.name} still running after {timeout_s:.0f} s\n{self.log_tail()}"
            ) from exc


@dataclass
class ProcessGroup:
    """The processes one fixture started; `stop()` ends exactly these, never anything else."""

    log_dir: Path
    started: list[Started] = field(default_factory=list)

    def start(self, name: str, *args: str | Path, env: Mapping[str, str] | None = None) -> Started:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        suffix = 1
        while log.exists():  # a restarted process keeps the first one's log
            suffix += 1
            log = self.log_dir / f"{name}-{suffix}.log"
        with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(
                [sys.executable, "-m", "aipipe", *map(str, args)],
                env=cli_env(env),
                cwd=self.log_dir,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        process = Started(name, popen, log)
        self.started.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(p.log_tail() for p in self.started)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM each of our processes still running; SIGKILL those outliving `grace_s`."""
        alive = [p for p in self.started if p.running()]
        for process in alive:
            with contextlib.suppress(ProcessLookupError):
                process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in alive:
            try:
                process.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()


# -- the hub ----------------------------------------------------------------------------------


@dataclass
class Hub:
    home: Path
    url: str
    process: Started

    @property
    def ca(self) -> Path | None:
        return hub_ca(self.home)

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return hub_verify(self.home)


def hub_ca(home: Path) -> Path | None:
    """The consortium CA `hub init` made (hub.yaml tls_ca), which signs the hub's certificate;
    None for a home without one."""
    config = yaml.safe_load((home / "hub.yaml").read_text())
    return None if config.get("tls_ca") is None else home / config["tls_ca"]


def without_tls(home: Path) -> Path:
    """The hub home as homes were before issue 15: hub.yaml names no certificate."""
    config = yaml.safe_load((home / "hub.yaml").read_text())
    config |= {"tls_cert": None, "tls_key": None, "tls_ca": None}
    (home / "hub.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return home


def hub_verify(home: Path) -> ssl.SSLContext | bool:
    """What httpx verifies the hub at `home` with: its consortium CA alone (as nodes do)."""
    ca = hub_ca(home)
    return True if ca is None else ssl.create_default_context(cafile=str(ca))


def _serving_url(home: Path, process: Started) -> str | None:
    """The URL once `serve.json` names this very process and /healthz answers 200."""
    if not process.running():
        raise AssertionError(
            f"hub serve exited with {process.popen.returncode} before it was ready\n"
            f"{process.log_tail()}"
        )
    try:
        info = json.loads((home / "serve.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("pid") != process.pid:  # a SIGKILLed hub leaves its serve.json behind
        return None
    try:
        response = httpx.get(f"{info['url']}/healthz", timeout=2, verify=hub_verify(home))
        healthy = response.status_code == 200
    except httpx.TransportError:
        return None
    return str(info["url"]) if healthy else None


def start_hub(group: ProcessGroup, home: Path, *, port: int = 0, name: str = "hub") -> Hub:
    process = group.start(name, "hub", "serve", "--home", home, "--port", str(port))
    url = wait_until(
        lambda: _serving_url(home, process),
        what=f"hub at {home} to serve",
        context=process.log_tail,
    )
    return Hub(home, url, process)


def restart_hub(group: ProcessGroup, hub: Hub) -> Hub:
    """Start the hub of a killed `hub` again on the port its stale serve.json names."""
    assert not hub.process.running(), "restart_hub is for a hub that was killed"
    old_url = json.loads((hub.home / "serve.json").read_text())["url"]
    port = urlsplit(old_url).port
    assert port is not None
    restarted = start_hub(group, hub.home, port=port, name=hub.process.name)
    assert restarted.url == old_url
    return restarted


# -- studies and updates ----------------------------------------------------------------------


def write_test_study(
    path: Path, *, name: str, deadline_s: float, secure: Mapping[str, Any] | None = None
) -> Path:
    """The heart-disease study, made small: 3 rounds of 5 DP-SGD steps, quorum of 2 nodes.

    `secure` adds fields such as {"secure": "secagg", "min_nodes": 3, "secure_options": ...}.
    """
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["name"] = name
    raw["training"] = {"rounds": 3, "local_steps": 5, "batch_size": 8, "lr": 0.01}
    raw["min_nodes"] = 2
    raw["round_deadline_s"] = deadline_s
    raw.update(secure or {})
    assert raw["privacy"]["mode"] == "dp" or "privacy" in (secure or {})  # DP unless asked
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@dataclass(frozen=True)
class NodeKeys:
    """A node's real identity key and hub credential, read from its home."""

    name: str
    identity: Identity
    credential: str

    @classmethod
    def load(cls, home: Path) -> NodeKeys:
        paths = load_node_config(home)
        credential = (home / "hub.credential").read_text().strip()
        return cls(paths.config.name, Identity.load(paths.identity_key), credential)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}


Arrays = Mapping[str, npt.NDArray[Any]]


def sign(identity: Identity, header: UpdateHeader) -> UpdateHeader:
    """The header with its Ed25519 signature over `signing_bytes()`, as the node worker does."""
    return header.model_copy(update={"signature": identity.sign(header.signing_bytes()).hex()})


def signed_update(
    identity: Identity,
    *,
    node: str,
    study: str,
    study_digest: str,
    round: int,
    base_version: str,
    delta: Arrays,
    num_examples: int = 10,
    signed: bool = True,
    epsilon: float | None = None,
) -> tuple[UpdateHeader, bytes]:
    """(header, payload) of one update, built like `NodeWorker._train` builds it."""
    payload = encode_arrays(delta)
    squares = sum(float(np.sum(np.square(np.nan_to_num(v, nan=0.0)))) for v in delta.values())
    header = UpdateHeader(
        node=node,
        study=study,
        study_digest=study_digest,
        round=round,
        base_version=base_version,
        num_examples=num_examples,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        epsilon_spent=epsilon,
        delta=None,
        train_loss=None,
        update_norm=float(np.sqrt(squares)),
        nonce=secrets.token_hex(16),
    )
    return (sign(identity, header) if signed else header), payload


def frame(header: UpdateHeader, payload: bytes) -> bytes:
    return pack_frame(header.model_dump_json().encode(), payload)


FRAME_HEADERS = {"Content-Type": MEDIA_TYPE}


# -- audit logs -------------------------------------------------------------------------------


def audit_events(home: Path, out: Path) -> list[dict[str, Any]]:
    """Every event of a home's audit log, through `aipipe audit export --format jsonl`."""
    aipipe("audit", "export", "--home", home, "--format", "jsonl", "--out", out)
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return [line for line in lines if "checkpoint" not in line]


def node_audit_events(home: Path) -> list[dict[str, Any]]:
    """A node's audit events (details parsed), read without taking a lock: for waiting on a
    node that is running, where `audit export` would append an event of its own."""
    conn = sqlite3.connect(f"file:{home / 'audit.sqlite'}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute("SELECT * FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()
    return [{**dict(row), "details": json.loads(row["details"])} for row in rows]


# -- a hub's SecAgg+ round, read from its store ---------------------------------------------


def _hub_rows(home: Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{home / 'hub.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def secagg_stage(home: Path, study: str, number: int) -> str | None:
    """The SecAgg+ stage the hub has recorded for a round (advertising … unmasking, done)."""
    rows = _hub_rows(
        home, "SELECT stage FROM secure_rounds WHERE study = ? AND round = ?", study, number
    )
    return str(rows[0][0]) if rows else None


def secagg_senders(home: Path, study: str, number: int, kind: str) -> set[str]:
    """Nodes whose `kind` message (advert, shares, masked, unmask) the hub logged for a round."""
    rows = _hub_rows(
        home,
        "SELECT node FROM secagg_log WHERE study = ? AND round = ? AND kind = ?",
        study,
        number,
        kind,
    )
    return {str(r[0]) for r in rows}


# -- a whole federation -----------------------------------------------------------------------


@dataclass
class Federation:
    """A hub and nodes on loopback, set up through the CLI (`Federation.running(...)`)."""

    root: Path
    group: ProcessGroup
    hub: Hub
    admin_token: str
    study: str
    study_file: Path
    nodes: dict[str, Path]
    daemons: dict[str, Started] = field(default_factory=dict)
    node_flags: tuple[str, ...] = ()  # extra `node init` flags, e.g. --allow-non-private

    @classmethod
    @contextlib.contextmanager
    def running(
        cls,
        root: Path,
        *,
        sites: tuple[str, ...] = SITES,
        deadline_s: float = 60.0,
        study: str = "e2e-heart",
        hub_config: Mapping[str, Any] | None = None,
        study_fields: Mapping[str, Any] | None = None,
        node_flags: tuple[str, ...] = (),
    ) -> Iterator[Federation]:
        """A hub and one node per site that enrolled, ingested its hospital's FHIR files and
        approved the published study (the test study with `study_fields`, as `publish` takes
        them). `hub_config` is merged into the hub's hub.yaml before it starts; `node_flags`
        go to every `node init`. Everything started is stopped on exit, also when the set-up
        fails half-way."""
        group = ProcessGroup(root / "logs")
        try:
            yield cls._set_up(
                root, group, sites, deadline_s, study, hub_config or {}, study_fields, node_flags
            )
        finally:
            group.stop()

    @classmethod
    def _set_up(
        cls,
        root: Path,
        group: ProcessGroup,
        sites: tuple[str, ...],
        deadline_s: float,
        study: str,
        hub_config: Mapping[str, Any],
        study_fields: Mapping[str, Any] | None,
        node_flags: tuple[str, ...] = (),
    ) -> Federation:
        hub_home = root / "hub"
        made = aipipe_in_process("hub", "init", "--home", hub_home, "--name", "e2e", "--json")
        token = json.loads(made.stdout)
        if hub_config:
            config = yaml.safe_load((hub_home / "hub.yaml").read_text()) | dict(hub_config)
            (hub_home / "hub.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        hub = start_hub(group, hub_home)
        fed = cls(
            root=root,
            group=group,
            hub=hub,
            admin_token=token["admin_token"],
            study=study,
            study_file=write_test_study(
                root / "study.yaml", name=study, deadline_s=deadline_s, secure=study_fields
            ),
            nodes={site: root / site for site in sites},
            node_flags=node_flags,
        )
        tokens = {site: fed._enrol_token(site) for site in sites}  # in turn: stdout is swapped
        with ThreadPoolExecutor(max_workers=len(sites) + 1) as pool:
            enrolments = [pool.submit(fed._enrol, site, tokens[site]) for site in sites]
            aipipe("study", "publish", fed.study_file, "--json", env=fed.admin_env)
            for future in enrolments:
                future.result()
        fed.approve(study)
        return fed

    def _enrol_token(self, site: str) -> str:
        """`hub enrol-token` for `site`, run in this process: the hub admin's local command, not
        what the tests are about, and ~2 s of imports each as a subprocess on two cores."""
        issued = aipipe_in_process(
            "hub", "enrol-token", "--home", self.hub.home, "--node", site, "--json"
        )
        return str(json.loads(issued.stdout)["token"])

    def _enrol(self, site: str, token: str) -> None:
        home = self.nodes[site]
        aipipe(
            "node", "init", "--home", home, "--name", site, "--json", *self.node_flags,
            env={"AIPIPE_ENROL_TOKEN": token},
        )  # fmt: skip
        aipipe("node", "ingest", "--home", home, HEART / "fhir" / site, "--json")

    def publish(
        self, study: str, *, deadline_s: float, secure: Mapping[str, Any] | None = None
    ) -> None:
        """Publish another copy of the test study under `study`; every node approves it."""
        study_file = write_test_study(
            self.root / f"{study}.yaml", name=study, deadline_s=deadline_s, secure=secure
        )
        aipipe("study", "publish", study_file, "--json", env=self.admin_env)
        self.approve(study)

    def approve(self, study: str) -> None:
        for home in self.nodes.values():  # one by one: the in-process runner swaps sys.stdout
            aipipe_in_process("node", "approve", study, "--home", home, "--json")

    # -- talking to the hub as the admin ---------------------------------------------------

    @property
    def admin_env(self) -> dict[str, str]:
        env = {"AIPIPE_HUB_URL": self.hub.url, "AIPIPE_TOKEN": self.admin_token}
        ca = self.hub.ca
        return env if ca is None else {**env, "AIPIPE_HUB_CA": str(ca)}

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.hub.url,
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30,
            verify=self.hub.verify,
        )

    def get(self, path: str, **params: str) -> Any:
        with self.admin() as client:
            response = client.get(path, params=params)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text}"
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        with self.admin() as client:
            response = client.post(path, json=body)
        assert response.status_code == 200, f"POST {path}: {response.status_code} {response.text}"
        return response.json()

    def round(self, number: int, study: str | None = None) -> dict[str, Any]:
        info: dict[str, Any] = self.get(f"/v1/studies/{study or self.study}/rounds/{number}")
        return info

    def open_round(self, deadline_s: float | None = None, study: str | None = None) -> Any:
        return self.post(f"/v1/studies/{study or self.study}/rounds", {"deadline_s": deadline_s})

    def wait_for_round(
        self, number: int, *states: str, study: str | None = None, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            info = self.round(number, study)
            return info if info["state"] in states else None

        return wait_until(
            reached,
            what=f"round {number} of {study or self.study} to be {' or '.join(states)}",
            timeout_s=timeout_s,
            context=self.group.logs,
        )

    def last_seen(self, site: str) -> str:
        rows = {row["name"]: row for row in self.get("/v1/nodes")}
        return str(rows[site]["last_seen"] or "")

    # -- node daemons ----------------------------------------------------------------------

    def start_daemons(
        self,
        *sites: str,
        poll_s: float = 1.0,
        extra: Mapping[str, tuple[str, ...]] | None = None,
    ) -> None:
        """`node start --poll` for each site (plus `extra[site]`, e.g. the hidden `--attack`);
        returns once each has long-polled the hub (its SIGTERM handler is installed before its
        first request)."""
        since = utc_stamp()
        for site in sites:
            self.daemons[site] = self.group.start(
                site, "node", "start", "--home", self.nodes[site], "--poll", str(poll_s),
                *(extra or {}).get(site, ()),
            )  # fmt: skip
        for site in sites:
            process = self.daemons[site]

            def polled(site: str = site, process: Started = process) -> bool:
                if not process.running():
                    raise AssertionError(f"{site} exited early\n{process.log_tail()}")
                return self.last_seen(site) > since

            wait_until(polled, what=f"node {site} to poll the hub", context=process.log_tail)

    def kill_hub(self) -> None:
        self.hub.process.kill()

    def restart_hub(self) -> None:
        self.hub = restart_hub(self.group, self.hub)
