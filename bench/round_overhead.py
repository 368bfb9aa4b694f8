"""Benchmark: wall time per federated round, aipipe against Flower, 1 hub + 4 node processes.

    .venv/bin/python bench/round_overhead.py             # 20 rounds × 3 repeats, every engine
    .venv/bin/python bench/round_overhead.py --quick     # 6 rounds × 1 repeat: a smoke run
    .venv/bin/python bench/round_overhead.py --engines aipipe,flower-legacy --privacy none
    .venv/bin/python bench/round_overhead.py --report bench/results/round_overhead.json
    .venv/bin/python bench/round_overhead.py --engines aipipe --personalization finetune

Writes bench/results/round_overhead.json (`-quick`, `-dp` suffixes for those runs). Flower lives
in its own venv, .cache/flwr-venv (git-ignored), made with `python -m venv` and
`pip install flwr==<--flwr> numpy` when missing; aipipe's venv is never touched.

A tiny model so that framework overhead dominates: the heart-disease study of `examples/` (4 UCI
hospitals, logistic 13→1) with `local_steps: 1`, `privacy: {mode: none}` (each node's `node.yaml`
sets `allow_non_private: true`; `--privacy dp` keeps DP-SGD on instead, aipipe only), and the
same for Flower: the same 4 sites' rows (aipipe's `extract` on each node store, saved as .npz),
the same initial weights (the hub's version 0), the same local step (Adam lr 1e-3, fresh per
round, one batch of 4 rows from a seeded permutation, BCE with logits), FedAvg weighted by
train rows, and a federated evaluation of every new model on each site's test split. Flower's
clients do that maths in float32 numpy (equal to torch's Adam step to ~1e-9), so they never
import torch: that favours Flower, whose Deployment Engine starts a process per message.

Engines, every process on 127.0.0.1, all started afresh for every repeat:

- `aipipe-personal` (with `--personalization M`): the same study with a `personalization:`
  block naming M (validation_fraction 0.2, the block's defaults; fedper and fenda on an MLP
  with one hidden layer of 16), published beside the plain one: each node personalizes the
  newest version it evaluated when the hub has no work for it (`aipipe.node.personal_pending`).
  Its ratio to `aipipe` (the plaintext round) is printed.

- `aipipe`: `aipipe hub serve` + 4 × `aipipe node start --poll P` daemons, then the user's
  command, `aipipe train run --study S --rounds N`. Times come from the hub's own store:
  `rounds.opened_at`, `rounds.closed_at` and `metrics.at` (microsecond UTC stamps).
- `aipipe+plain`: the same over plain HTTP (`hub serve --insecure-http` on loopback, the nodes'
  hub URL switched to http://): what TLS 1.3 costs a round is `aipipe` against it, same run.
  `aipipe` itself is HTTPS (the hub's certificate from `hub init`'s consortium CA, pinned by
  the nodes through their enrolment tokens), as deployed.
- `aipipe+audit`: a what-if that sizes the audit log's cost, not a product: the hub's and
  nodes' audit logs at `PRAGMA synchronous=NORMAL` (no fsync per append; a durability trade).
  The earlier what-ifs (`nodelay`: TCP_NODELAY on the hub's socket; `poll`/`step`: the 0.5 s
  and 0.2 s polls) found 0.58 → 0.23 s a round and are now fixed in the product.
- `flower-legacy`: Flower's `start_server` + 4 × `start_client` (gRPC bidirectional streams,
  deprecated since Flower 1.13 but still shipped), `flwr.server.strategy.FedAvg`.
- `flower-deployment`: Flower's Deployment Engine, `flower-superlink` + 4 × `flower-supernode`
  (subprocess isolation, the default), a Flower App submitted with `flwr run`, Message-API
  `flwr.serverapp.strategy.FedAvg`.

What is timed, per round r (every engine stamps the same three moments):

- `closed`: round opened → new global model aggregated (aipipe: the hub's `opened_at` and
  `closed_at` stamps; Flower: `configure_fit`/`configure_train` entered →
  `aggregate_fit`/`aggregate_train` returned).
- `metrics`: round opened → the last site's evaluation of the new model is in (aipipe: last
  `metrics.at`; Flower: `aggregate_evaluate` returned).
- `cycle`: round r opened → round r + 1 opened: the wall time per round a user sees; for Flower
  the next round starts as soon as the evaluation is aggregated, for aipipe when `train run`
  sees the metrics (a long-poll on the round).

Excluded: starting the processes, enrolment/ingest/approval, Flower's wait for its clients to
connect (the start stamp is taken after all 4 are connected), round 1 of every repeat (warm-up:
feature extraction, first torch call, first connection) and, for `cycle`, the last round.
Engines alternate within each repeat (rotating the order) so load from other processes on the
2 shared cores hits them alike; medians and ratios come from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import common
import httpx
import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "heart-disease"
SITES = ("cleveland", "hungarian", "switzerland", "va")
FLWR_VENV = ROOT / ".cache" / "flwr-venv"
STUDY = "round-overhead"
ENGINES = (
    "aipipe",
    "aipipe+plain",
    "aipipe+audit",
    "flower-legacy",
    "flower-deployment",
)
FLOWER_ENGINES = ("flower-legacy", "flower-deployment")
# `--personalization M`: the same study with a `personalization:` block naming M, published
# beside the plain one and run as this engine, alternated with `aipipe` (the plaintext round).
PERSONAL_ENGINE = "aipipe-personal"
PERSONAL_MLP = [16]  # fedper and fenda federate hidden layers: an MLP for them
# What-ifs: (processes patched, code run before the CLI).
WHAT_IFS = {
    "plain": ((), ""),  # no process patched: `start_hub` serves plain HTTP
    "audit": (
        ("hub", "node"),
        "import aipipe.audit.log as m; connect = m.connect; "
        "m.connect = lambda path: (c := connect(path)).execute('PRAGMA synchronous=NORMAL') and c",
    ),
}
console = Console(width=None if sys.stdout.isatty() else 150)


# -- the Flower side, run by Flower's own venv ------------------------------------------------

FLOWER_SIDE = r'''
"""Flower side of bench/round_overhead.py, written out and run with Flower's own venv."""

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg as MessageFedAvg

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as aipipe's nodes use


class Task:
    """aipipe's local step and evaluation (aipipe.models.training) for Linear(13, 1) + BCE with
    logits, in float32 numpy: no torch import, so Flower's per-message ClientApp processes
    start as fast as they can."""

    def __init__(self, path, lr, batch, steps):
        data = np.load(path)
        self.site = str(data["site"])
        self.x_train = data["x_train"].astype(np.float32)
        self.y_train = data["y_train"].astype(np.float32)
        self.x_test = data["x_test"].astype(np.float32)
        self.y_test = data["y_test"].astype(np.float32)
        self.lr, self.batch, self.steps = lr, batch, steps

    def fit(self, arrays, server_round):
        """`local_steps` Adam steps (a fresh optimizer, as each aipipe round), one batch each
        from a seeded permutation, reshuffled per epoch."""
        params = [np.array(a, dtype=np.float32) for a in arrays]
        moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
        rng = np.random.default_rng(zlib.crc32(f"{self.site}:{server_round}".encode()))
        n, batch = len(self.y_train), min(self.batch, len(self.y_train))
        order, cursor = rng.permutation(n), 0
        for step in range(1, self.steps + 1):
            if cursor + batch > n:
                order, cursor = rng.permutation(n), 0
            idx = order[cursor : cursor + batch]
            cursor += batch
            x, y = self.x_train[idx], self.y_train[idx]
            dz = (_sigmoid(x @ params[0][0] + params[1][0]) - y) / len(idx)
            grads = [(dz @ x)[None, :], np.array([dz.sum()], dtype=np.float32)]
            for i, (p, g) in enumerate(zip(params, grads)):
                m, v = moments[i]
                m = BETA1 * m + (1 - BETA1) * g
                v = BETA2 * v + (1 - BETA2) * g * g
                moments[i] = (m, v)
                m_hat, v_hat = m / (1 - BETA1**step), v / (1 - BETA2**step)
                params[i] = (p - self.lr * m_hat / (np.sqrt(v_hat) + EPS)).astype(np.float32)
        return params, n

    def evaluate(self, arrays):
        z = self.x_test @ np.asarray(arrays[0])[0] + np.asarray(arrays[1])[0]
        y = self.y_test
        loss = float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))
        accuracy = float(np.mean((z > 0) == (y == 1)))
        return loss, len(y), {"accuracy": accuracy, "auc": auc(y, z)}


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def auc(y, s):
    """ROC AUC by the rank-sum formula, ties averaged (what sklearn's roc_auc_score gives)."""
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return -1.0
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def weighted(metrics):
    total = sum(n for n, _ in metrics)
    keys = metrics[0][1].keys() if metrics else ()
    return {k: sum(n * m[k] for n, m in metrics) / total for k in keys}


def initial_arrays(path):
    init = np.load(path)
    return [init["weight"], init["bias"]]


# -- legacy: start_server / start_client, gRPC bidirectional streams --------------------------


def legacy_server(args):
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    times = {}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            client_manager.wait_for(args.clients, timeout=300)
            times[server_round] = {"start": time.time()}
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            times[server_round].update(closed=time.time(), updates=len(results))
            return out

        def aggregate_evaluate(self, server_round, results, failures):
            out = super().aggregate_evaluate(server_round, results, failures)
            times[server_round].update(metrics=time.time(), evaluations=len(results))
            return out

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=args.clients,
        min_evaluate_clients=args.clients,
        min_available_clients=args.clients,
        initial_parameters=ndarrays_to_parameters(initial_arrays(args.init)),
        on_fit_config_fn=lambda server_round: {"round": server_round},
        fit_metrics_aggregation_fn=weighted,
        evaluate_metrics_aggregation_fn=weighted,
    )
    start_server(
        server_address=args.address,
        config=ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
    )
    Path(args.out).write_text(json.dumps(times))


def legacy_client(args):
    from flwr.client import NumPyClient, start_client

    task = Task(args.data, args.lr, args.batch, args.steps)

    class SiteClient(NumPyClient):
        def fit(self, parameters, config):
            weights, n = task.fit(parameters, int(config.get("round", 0)))
            return weights, n, {}

        def evaluate(self, parameters, config):
            return task.evaluate(parameters)

    start_client(server_address=args.address, client=SiteClient().to_client(), insecure=True)


# -- Deployment Engine: ServerApp and ClientApp (flower-superlink, flower-supernode, flwr run) --

client_app = ClientApp()
server_app = ServerApp()
_tasks = {}


def _task(context):
    cfg, run = context.node_config, context.run_config
    key = cfg["data"]
    if key not in _tasks:
        _tasks[key] = Task(key, float(run["lr"]), int(run["batch"]), int(run["steps"]))
    return _tasks[key]


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    task = _task(context)
    server_round = int(msg.content["config"]["server-round"])
    weights, n = task.fit(msg.content["arrays"].to_numpy_ndarrays(), server_round)
    content = RecordDict(
        {"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    loss, n, metrics = _task(context).evaluate(msg.content["arrays"].to_numpy_ndarrays())
    record = MetricRecord({"loss": loss, "num-examples": n, **metrics})
    return Message(content=RecordDict({"metrics": record}), reply_to=msg)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    run = context.run_config
    clients = int(run["clients"])
    times = {}
    deadline = time.time() + 300
    while len(list(grid.get_node_ids())) < clients and time.time() < deadline:
        time.sleep(0.1)

    class TimedFedAvg(MessageFedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            times[server_round] = {"start": time.time()}
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            times[server_round].update(closed=time.time(), updates=len(replies))
            return out

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            out = super().aggregate_evaluate(server_round, replies)
            times[server_round].update(metrics=time.time(), evaluations=len(replies))
            return out

    strategy = TimedFedAvg(
        min_train_nodes=clients, min_evaluate_nodes=clients, min_available_nodes=clients
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial_arrays(str(run["init"]))),
        num_rounds=int(run["num-server-rounds"]),
    )
    Path(str(run["out"])).write_text(json.dumps(times))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["legacy-server", "legacy-client"])
    parser.add_argument("--address", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--init")
    parser.add_argument("--out")
    parser.add_argument("--data")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()
    (legacy_server if args.role == "legacy-server" else legacy_client)(args)


if __name__ == "__main__":
    main()
'''

FLOWER_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "roundbench"
version = "1.0.0"
description = "aipipe bench/round_overhead.py: the Flower side"
license = "Apache-2.0"
dependencies = ["flwr=={flwr}", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "aipipe"

[tool.flwr.app.components]
serverapp = "roundbench_flower:server_app"
clientapp = "roundbench_flower:client_app"

[tool.flwr.app.config]
num-server-rounds = 1
clients = 4
lr = 0.001
batch = 4
steps = 1
init = ""
out = ""
"""


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Processes:
    """The processes one run started; each in its own session so that its children go too."""

    logs: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        handle = (self.logs / f"{name}.log").open("ab")
        self.started.append(
            subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.logs,
                start_new_session=True,
            )
        )

    def stop(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for process in self.started:  # children that outlived their leader (superexec, ...)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        self.started.clear()


@contextlib.contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    group = Processes(logs)
    try:
        yield group
    finally:
        group.stop()


def wait_until(check: Any, what: str, timeout_s: float = 120.0, step_s: float = 0.1) -> Any:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with contextlib.suppress(httpx.TransportError, OSError, ValueError):
            if result := check():
                return result
        time.sleep(step_s)
    sys.exit(f"timed out waiting for {what}")


# -- aipipe -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AipipeSite:
    work: Path
    hub_home: Path
    token: str
    port: int
    study_yaml: Path
    personal_yaml: Path | None = None  # the personalized study, with --personalization


def aipipe(*args: str, env: dict[str, str] | None = None) -> str:
    command = [sys.executable, "-m", "aipipe", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        sys.exit(f"aipipe {' '.join(args[:2])} failed:\n{result.stderr}")
    return result.stdout


def patched(what_ifs: list[str], process: str) -> list[str]:
    """The aipipe CLI as `python -c`, after the what-ifs that patch this process."""
    lines = [WHAT_IFS[w][1] for w in what_ifs if process in WHAT_IFS[w][0]]
    lines.append("from aipipe.cli.app import main; main()")
    return [sys.executable, "-c", "\n".join(lines)]


def study_yaml(work: Path, rounds: int, privacy: str, personalization: str | None = None) -> Path:
    spec = yaml.safe_load((DATA / "study.yaml").read_text())
    spec["name"] = STUDY if personalization is None else personal_study(personalization)
    # The step both engines run (the Flower clients' `Task.fit`): one Adam step at lr 1e-3 on a
    # batch of 4, FLamby's constants; the shipped study itself trains with SGD at lr 0.5.
    spec["training"].update(local_steps=1, rounds=rounds, optimizer="adam", lr=1e-3, batch_size=4)
    if privacy == "none":
        spec["privacy"] = {"mode": "none"}
    spec["round_deadline_s"] = 120
    if personalization is not None:
        spec["personalization"] = {"method": personalization, "validation_fraction": 0.2}
        if personalization in ("fedper", "fenda"):
            spec["model"] = {"kind": "mlp", "hidden": PERSONAL_MLP}
    path = work / ("study.yaml" if personalization is None else "study-personal.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def personal_study(method: str) -> str:
    return f"{STUDY}-{method}"


def setup_aipipe(
    work: Path, rounds: int, privacy: str, personalization: str | None = None
) -> AipipeSite:
    """Hub, 4 enrolled nodes with their own FHIR data, the study (and with `personalization`
    the personalized one) published and approved."""
    hub_home = work / "hub"
    token = json.loads(aipipe("hub", "init", "--home", str(hub_home), "--name", "bench", "--json"))
    personal = None
    if personalization is not None:
        personal = study_yaml(work, rounds, privacy, personalization)
    site = AipipeSite(
        work,
        hub_home,
        token["admin_token"],
        free_port(),
        study_yaml(work, rounds, privacy),
        personal,
    )
    env = {**os.environ, "AIPIPE_TOKEN": site.token, "AIPIPE_HUB_CA": str(hub_ca(site))}
    with processes(work) as group:
        url = start_hub(group, site, [])
        env["AIPIPE_HUB_URL"] = url
        for name in SITES:
            out = aipipe("hub", "enrol-token", "--home", str(hub_home), "--node", name, "--json")
            home = str(work / name)
            enrol_env = {**env, "AIPIPE_ENROL_TOKEN": json.loads(out)["token"]}
            aipipe("node", "init", "--home", home, "--name", name, "--json", env=enrol_env)
            aipipe("node", "ingest", "--home", home, str(DATA / "fhir" / name), "--json")
            if privacy == "none":
                config = work / name / "node.yaml"
                raw = yaml.safe_load(config.read_text())
                config.write_text(yaml.safe_dump({**raw, "allow_non_private": True}))
        studies = {STUDY: site.study_yaml}
        if personalization is not None and personal is not None:
            studies[personal_study(personalization)] = personal
        for study, path in studies.items():
            aipipe("study", "publish", str(path), "--json", env=env)
            for name in SITES:
                aipipe("node", "approve", study, "--home", str(work / name), "--json", env=env)
    return site


def hub_ca(site: AipipeSite) -> Path:
    return site.hub_home / "ca-cert.pem"  # the consortium CA `hub init` made


def hub_verify(env: dict[str, str]) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=env["AIPIPE_HUB_CA"])


def start_hub(group: Processes, site: AipipeSite, what_ifs: list[str]) -> str:
    """`hub serve`: HTTPS, or plain HTTP on loopback with the `plain` what-if; the URL."""
    args = ["hub", "serve", "--home", str(site.hub_home), "--port", str(site.port)]
    plain = "plain" in what_ifs
    group.start("hub", patched(what_ifs, "hub") + args + (["--insecure-http"] if plain else []))
    url = f"{'http' if plain else 'https'}://127.0.0.1:{site.port}"
    trust = ssl.create_default_context(cafile=str(hub_ca(site)))
    wait_until(
        lambda: httpx.get(f"{url}/healthz", timeout=2, verify=trust).status_code == 200, "the hub"
    )
    return url


def point_nodes(site: AipipeSite, url: str) -> None:
    """Each node's hub URL (node.yaml) to `url`: https, or http for the `plain` what-if."""
    for name in SITES:
        config = site.work / name / "node.yaml"
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({**raw, "hub_url": url}, sort_keys=False))


def export_site_data(site: AipipeSite, out: Path) -> dict[str, Path]:
    """Each site's matrices as aipipe's nodes see them, and the hub's version-0 weights."""
    from aipipe.models import build_model, weights_to_arrays
    from aipipe.node.home import open_node, open_store
    from aipipe.study.features import extract
    from aipipe.study.spec import load_study

    spec = load_study(site.study_yaml)
    paths: dict[str, Path] = {}
    for name in SITES:
        store = open_store(open_node(site.work / name))
        try:
            m = extract(store, spec)
        finally:
            store.close()
        paths[name] = out / f"{name}.npz"
        np.savez(paths[name], site=name, x_train=m.x_train, y_train=m.y_train,
                 x_test=m.x_test, y_test=m.y_test)  # fmt: skip
    init = weights_to_arrays(build_model(spec.model, len(spec.columns()), seed=0))
    paths["init"] = out / "init.npz"
    np.savez(paths["init"], weight=init["head.weight"], bias=init["head.bias"])
    return paths


def run_aipipe(
    site: AipipeSite, args: argparse.Namespace, what_ifs: list[str], study: str = STUDY
) -> dict:
    rounds, poll = args.rounds, args.poll
    env = {**os.environ, "AIPIPE_TOKEN": site.token, "AIPIPE_HUB_CA": str(hub_ca(site))}
    with processes(site.work) as group:
        env["AIPIPE_HUB_URL"] = start_hub(group, site, what_ifs)
        point_nodes(site, env["AIPIPE_HUB_URL"])
        since = utc_now()
        for name in SITES:
            command = ["node", "start", "--home", str(site.work / name), "--poll", str(poll)]
            group.start(name, patched(what_ifs, "node") + command)
        wait_until(lambda: nodes_polling(env, since), "4 node daemons polling the hub")
        command = ["train", "run", "--study", study, "--rounds", str(rounds), "--json"]
        began = time.monotonic()
        out = subprocess.run(
            patched(what_ifs, "cli") + command,
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        wall = time.monotonic() - began
    if out.returncode != 0:
        sys.exit(f"aipipe train run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    timeline = hub_timeline(site.hub_home / "hub.sqlite", since, study)
    if len(timeline) != rounds or any(r["state"] != "closed" for r in timeline.values()):
        sys.exit(f"aipipe ran {len(timeline)} of {rounds} rounds, not all closed; see its logs")
    return {"rounds": timeline, "command_wall_s": wall}


def nodes_polling(env: dict[str, str], since: str) -> bool:
    headers = {"Authorization": f"Bearer {env['AIPIPE_TOKEN']}"}
    url = f"{env['AIPIPE_HUB_URL']}/v1/nodes"
    nodes = httpx.get(url, headers=headers, timeout=2, verify=hub_verify(env)).json()
    return sum(1 for n in nodes if (n["last_seen"] or "") > since) == len(SITES)


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ts(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def hub_timeline(db: Path, since: str, study: str = STUDY) -> dict[str, dict[str, Any]]:
    """Rounds of `study` opened after `since`: opened, closed, each update's and evaluation's
    arrival."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        timeline: dict[str, dict[str, Any]] = {}
        query = "SELECT round FROM rounds WHERE study = ? AND opened_at > ? ORDER BY round"
        for (number,) in conn.execute(query, (study, since)).fetchall():
            opened, closed, version, state = conn.execute(
                "SELECT opened_at, closed_at, result_version, state FROM rounds "
                "WHERE study = ? AND round = ?",
                (study, number),
            ).fetchone()
            updates = conn.execute(
                "SELECT at FROM round_nodes WHERE study = ? AND round = ? AND status = 'reported'",
                (study, number),
            ).fetchall()
            evals = conn.execute("SELECT at FROM metrics WHERE version = ?", (version,)).fetchall()
            timeline[str(number)] = {
                "state": state,
                "start": _ts(opened),
                "closed": _ts(closed) if closed else None,
                "metrics": max(_ts(e[0]) for e in evals) if evals else None,
                "updates_at": sorted(_ts(u[0]) for u in updates),
                "evals_at": sorted(_ts(e[0]) for e in evals),
            }
        return timeline
    finally:
        conn.close()


# -- Flower -------------------------------------------------------------------------------------


def flower_python(version: str) -> Path:
    """Flower's own venv under .cache/ (never aipipe's), created and filled if missing."""
    python = FLWR_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLWR_VENV)], check=True)
    probe = [str(python), "-c", "import flwr; print(flwr.__version__)"]
    found = subprocess.run(probe, capture_output=True, text=True, check=False).stdout.strip()
    if found != version:
        console.print(f"installing flwr=={version} into {FLWR_VENV}")
        packages = [f"flwr=={version}", "numpy"]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return python


def flower_env(home: Path) -> dict[str, str]:
    path = f"{FLWR_VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def write_flower_app(out: Path, version: str) -> Path:
    app = out / "flower-app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "roundbench_flower.py").write_text(FLOWER_SIDE.lstrip())
    (app / "pyproject.toml").write_text(FLOWER_PYPROJECT.replace("{flwr}", version).lstrip())
    return app


def local_step(site: AipipeSite) -> list[str]:
    """The study's local training settings, as the Flower side's options."""
    training = yaml.safe_load(site.study_yaml.read_text())["training"]
    return ["--lr", str(training["lr"]), "--batch", str(training["batch_size"]),
            "--steps", str(training["local_steps"])]  # fmt: skip


def run_flower_legacy(
    python: Path, app: Path, data: dict[str, Path], rounds: int, step: list[str]
) -> dict:
    logs = app.parent / "flower-legacy"
    logs.mkdir(exist_ok=True)
    out = logs / f"times-{time.monotonic_ns()}.json"
    address = f"127.0.0.1:{free_port()}"
    script = str(app / "roundbench_flower.py")
    env = flower_env(logs / "home")
    with processes(logs) as group:
        server = [str(python), script, "legacy-server", "--address", address]
        server += ["--rounds", str(rounds), "--init", str(data["init"]), "--out", str(out)]
        group.start("server", server, env)
        for name in SITES:
            client = [str(python), script, "legacy-client", "--address", address]
            group.start(name, [*client, "--data", str(data[name]), *step], env)
        wait_until(out.exists, "Flower's server to finish", timeout_s=60 + 30 * rounds)
    return {"rounds": json.loads(out.read_text())}


def run_flower_deployment(
    python: Path, app: Path, data: dict[str, Path], rounds: int, step: list[str]
) -> dict:
    logs = app.parent / "flower-deployment"
    logs.mkdir(exist_ok=True)
    home = logs / "home"
    home.mkdir(exist_ok=True)
    out = logs / f"times-{time.monotonic_ns()}.json"
    port = free_port()  # Flower 1.42 serves its Fleet, Control and Runtime APIs on one port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    bin_dir = python.parent
    with processes(logs) as group:
        superlink = [str(bin_dir / "flower-superlink"), "--insecure"]
        group.start("superlink", [*superlink, "--host", "127.0.0.1", "--port", str(port)], env)
        wait_until(lambda: port_open(port), "the SuperLink")
        for name in SITES:
            node = [str(bin_dir / "flower-supernode"), "--insecure"]
            node += ["--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1"]
            node += ["--port", str(free_port()), "--node-config", f'data="{data[name]}"']
            group.start(name, node, env)
        config = f'num-server-rounds={rounds} init="{data["init"]}" out="{out}"'
        config += "".join(f" {k[2:]}={v}" for k, v in zip(step[::2], step[1::2], strict=True))
        submit = [str(bin_dir / "flwr"), "run", str(app), "bench", "--run-config", config]
        result = subprocess.run(submit, capture_output=True, text=True, env=env, check=False)
        if result.returncode != 0:
            sys.exit(f"flwr run failed:\n{result.stdout}\n{result.stderr}")
        wait_until(out.exists, "Flower's ServerApp to finish", timeout_s=120 + 30 * rounds)
    return {"rounds": json.loads(out.read_text())}


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# -- figures ------------------------------------------------------------------------------------


def per_round(run: dict) -> dict[str, list[float]]:
    """closed, metrics and cycle seconds of every round but the first (warm-up)."""
    rows = [run["rounds"][k] for k in sorted(run["rounds"], key=int)]
    figures: dict[str, list[float]] = {"closed": [], "metrics": [], "cycle": []}
    for i, row in enumerate(rows[1:], start=1):
        figures["closed"].append(row["closed"] - row["start"])
        figures["metrics"].append(row["metrics"] - row["start"])
        if i + 1 < len(rows):
            figures["cycle"].append(rows[i + 1]["start"] - row["start"])
    return figures


def aipipe_breakdown(run: dict) -> dict[str, list[float]]:
    """Where an aipipe round's time goes, from the hub's stamps (rounds after the first)."""
    rows = [run["rounds"][k] for k in sorted(run["rounds"], key=int)]
    parts: dict[str, list[float]] = {
        "open→first update": [],
        "open→last update": [],
        "last update→closed": [],
        "closed→first eval": [],
        "closed→last eval": [],
        "last eval→next open": [],
    }
    for i, row in enumerate(rows[1:], start=1):
        parts["open→first update"].append(row["updates_at"][0] - row["start"])
        parts["open→last update"].append(row["updates_at"][-1] - row["start"])
        parts["last update→closed"].append(row["closed"] - row["updates_at"][-1])
        parts["closed→first eval"].append(row["evals_at"][0] - row["closed"])
        parts["closed→last eval"].append(row["evals_at"][-1] - row["closed"])
        if i + 1 < len(rows):
            parts["last eval→next open"].append(rows[i + 1]["start"] - row["evals_at"][-1])
    return parts


def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summarise(results: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for engine, runs in results.items():
        pooled: dict[str, list[float]] = {"closed": [], "metrics": [], "cycle": []}
        for run in runs:
            for key, values in per_round(run).items():
                pooled[key] += values
        summary[engine] = {
            f"{key}_{stat}": fn(values)
            for key, values in pooled.items()
            for stat, fn in (("median_s", statistics.median), ("p90_s", p90))
        }
        summary[engine]["rounds_timed"] = len(pooled["closed"])
        summary[engine]["cycle_mean_s"] = statistics.fmean(pooled["cycle"])
        summary[engine]["cycle_median_by_repeat_s"] = [
            statistics.median(per_round(run)["cycle"]) for run in runs
        ]
        if engine.startswith("aipipe"):
            parts: dict[str, list[float]] = {}
            for run in runs:
                for key, values in aipipe_breakdown(run).items():
                    parts.setdefault(key, []).extend(values)
            medians = {k: statistics.median(v) for k, v in parts.items()}
            summary[engine]["breakdown_median_s"] = medians
            summary[engine]["train_run_wall_s"] = [run["command_wall_s"] for run in runs]
    if "aipipe" in summary and PERSONAL_ENGINE in summary:
        row, base = summary[PERSONAL_ENGINE], summary["aipipe"]
        row["ratio_to_aipipe"] = {
            key: row[f"{key}_median_s"] / base[f"{key}_median_s"]
            for key in ("cycle", "closed", "metrics")
        }
    for row in summary.values():
        for flower in FLOWER_ENGINES:
            if flower in summary:
                for key in ("cycle", "closed", "metrics"):
                    base = summary[flower][f"{key}_median_s"]
                    row.setdefault("ratio", {}).setdefault(flower, {})[key] = (
                        row[f"{key}_median_s"] / base
                    )
    return summary


TABLE_FIGURES = (
    "cycle_median_s",
    "cycle_p90_s",
    "cycle_mean_s",
    "closed_median_s",
    "metrics_median_s",
)


def table(summary: dict[str, dict[str, Any]]) -> Table:
    out = Table(title="seconds per federated round (rounds 2..N of every repeat, pooled)")
    out.add_column("engine", no_wrap=True)
    no_wrap = {"cycle med by repeat"}
    columns = ("rounds", "cycle med", "cycle p90", "cycle mean", "closed med", "+eval med",
               "cycle med by repeat", "÷ legacy", "÷ deploy")  # fmt: skip
    for column in columns:
        out.add_column(column, justify="right", no_wrap=column in no_wrap)
    for engine, row in summary.items():
        ratios = row.get("ratio", {})
        out.add_row(
            engine,
            str(row["rounds_timed"]),
            *(f"{row[key]:.3f}" for key in TABLE_FIGURES),
            "/".join(f"{v:.3f}" for v in row["cycle_median_by_repeat_s"]),
            *(f"{ratios[f]['cycle']:.3g}×" if f in ratios else "–" for f in FLOWER_ENGINES),
        )
    out.caption = (
        "cycle = round opened → next round opened (the wall time per round); closed = opened → "
        "new model aggregated; +eval = opened → last site's evaluation of it in (p90s of both "
        "in the JSON). Ratios: the row's cycle median ÷ that of the Flower engine."
    )
    return out


def breakdown_table(summary: dict[str, dict[str, Any]]) -> Table:
    rows = {e: r["breakdown_median_s"] for e, r in summary.items() if "breakdown_median_s" in r}
    out = Table(title="where an aipipe round goes (hub's own stamps, median seconds)")
    out.add_column("interval")
    for engine in rows:
        out.add_column(engine, justify="right")
    for part in next(iter(rows.values()), {}):
        out.add_row(part, *(f"{rows[e][part]:.3f}" for e in rows))
    return out


# -- main ---------------------------------------------------------------------------------------


def environment(flwr_version: str) -> dict[str, Any]:
    import torch

    import aipipe

    return common.machine(
        aipipe=aipipe.__version__,
        flwr=flwr_version,
        torch=torch.__version__,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),  # torch's intra-op threads
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds per repeat (≥ 3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--poll", type=float, default=10.0, help="node start --poll (seconds)")
    parser.add_argument("--privacy", choices=("none", "dp"), default="none")
    parser.add_argument(
        "--personalization",
        default=None,
        help=f"a method: adds engine {PERSONAL_ENGINE}, the study personalized with it",
    )
    parser.add_argument("--flwr", default="1.42.0", help="Flower version for its own venv")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--quick", action="store_true", help="6 rounds, 1 repeat")
    parser.add_argument(
        "--report", type=Path, help="re-summarise a results file's runs and print its tables"
    )
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    if args.quick:
        args.rounds, args.repeats = 6, 1
    engines = [e for e in args.engines.split(",") if e]
    if args.personalization is not None and PERSONAL_ENGINE not in engines:
        engines.append(PERSONAL_ENGINE)
    if PERSONAL_ENGINE in engines and args.personalization is None:
        parser.error(f"engine {PERSONAL_ENGINE} needs --personalization METHOD")
    unknown = {e for e in engines if e not in FLOWER_ENGINES and not is_aipipe(e)}
    if unknown or args.rounds < 3:
        parser.error(f"unknown engines {sorted(unknown)} or --rounds < 3")
    if args.privacy == "dp" and set(engines) & set(FLOWER_ENGINES):
        parser.error("--privacy dp times aipipe only: pass --engines with aipipe engines")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="round-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run_all(args, engines, work)
    console.print(f"finished in {time.monotonic() - started:.0f} s; files in {work}")


def report(path: Path) -> None:
    """Tables from a results file; its summary is recomputed from its runs and rewritten."""
    payload = json.loads(path.read_text())
    summary = summarise(payload["runs"])
    console.print(table(summary))
    if any(is_aipipe(engine) for engine in summary):
        console.print(breakdown_table(summary))
    print_personal(summary)
    payload["summary"] = summary
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def print_personal(summary: dict[str, dict[str, Any]]) -> None:
    ratio = summary.get(PERSONAL_ENGINE, {}).get("ratio_to_aipipe")
    if ratio is not None:
        console.print(
            f"{PERSONAL_ENGINE} ÷ aipipe (medians): cycle {ratio['cycle']:.2f}×, "
            f"closed {ratio['closed']:.2f}×, +eval {ratio['metrics']:.2f}×"
        )


def is_aipipe(engine: str) -> bool:
    if engine == PERSONAL_ENGINE:
        return True
    head, *what_ifs = engine.split("+")
    return head == "aipipe" and all(w in WHAT_IFS for w in what_ifs)


def run_all(args: argparse.Namespace, engines: list[str], work: Path) -> None:
    total_rounds = args.rounds * args.repeats * len(engines) + 10
    console.rule(f"setup in {work}")
    site = setup_aipipe(work / "aipipe", total_rounds, args.privacy, args.personalization)
    data = export_site_data(site, work)
    python = flower_python(args.flwr) if set(engines) & set(FLOWER_ENGINES) else None
    app = write_flower_app(work, args.flwr)
    results: dict[str, list[dict]] = {engine: [] for engine in engines}
    for repeat in range(args.repeats):
        order = engines[repeat % len(engines) :] + engines[: repeat % len(engines)]
        for engine in order:
            began = time.monotonic()
            if engine == PERSONAL_ENGINE:
                run = run_aipipe(site, args, [], personal_study(args.personalization))
            elif is_aipipe(engine):
                run = run_aipipe(site, args, engine.split("+")[1:])
            elif engine == "flower-legacy":
                assert python is not None
                run = run_flower_legacy(python, app, data, args.rounds, local_step(site))
            else:
                assert python is not None
                run = run_flower_deployment(python, app, data, args.rounds, local_step(site))
            run["repeat"] = repeat
            run["elapsed_s"] = time.monotonic() - began
            results[engine].append(run)
            cycle = statistics.median(per_round(run)["cycle"])
            console.print(f"repeat {repeat + 1} {engine:18} median cycle {cycle:.3f} s/round")
    summary = summarise(results)
    console.print(table(summary))
    if any(is_aipipe(engine) for engine in engines):
        console.print(breakdown_table(summary))
    print_personal(summary)
    write_results(args, engines, summary, results, total_rounds)


def write_results(
    args: argparse.Namespace,
    engines: list[str],
    summary: dict[str, dict[str, Any]],
    results: dict[str, list[dict]],
    study_rounds: int,
) -> None:
    name = "round_overhead-quick" if args.quick else "round_overhead"
    if args.privacy == "dp":
        name += "-dp"
    if args.personalization is not None:
        name += f"-personal-{args.personalization}"
    path = ROOT / "bench" / "results" / f"{name}.json"
    payload = {
        "benchmark": "round_overhead",
        "command": " ".join([".venv/bin/python", "bench/round_overhead.py", *sys.argv[1:]]),
        "config": {
            "rounds": args.rounds,
            "repeats": args.repeats,
            "engines": engines,
            "sites": list(SITES),
            "model": "logistic 13→1",
            "local_steps": 1,
            "batch_size": 4,
            "optimizer": "adam",
            "lr": 0.001,
            "privacy": args.privacy,
            "personalization": args.personalization,
            "node_poll_s": args.poll,
            "study_rounds_declared": study_rounds,
            "excluded": "process start-up, setup, Flower's wait for its clients, round 1 of "
            "each repeat, and for cycle the last round",
        },
        "environment": environment(args.flwr),
        "summary": summary,
        "runs": results,
    }
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    console.print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
