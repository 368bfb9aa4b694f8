"""Benchmark: what a personalized round asks of a node and the hub against a plain round, in one
process (a profile for `round_overhead.py --personalization`, whose whole-round ratio the shared
machine's noise swamps).

    OMP_NUM_THREADS=1 .venv/bin/python bench/personal_round_work.py --method finetune --rounds 20

The hub app in-process (the test suite's harness, `tests/hub_support.py`), the 4 heart-disease
sites as real node homes with their own workers (one each, as a daemon keeps one), both studies
of `round_overhead.py` (the plain round-overhead study and the same with a `personalization:`
block) published side by side. Each round opens the plain study's round and then the
personalized one's, so load from other processes hits both alike; each node polls, trains,
polls and evaluates, timed per work item, and the audit events each node appended are counted.
Round 1 of each study is left out (feature extraction, first torch calls). No personal model is
made: as in back-to-back rounds, the daemon makes it only when the hub has no work.

Writes bench/results/personal_round_work-<method>.json: medians per (study, work item) of the
node's whole work item and of its weights download (the hub's access check and blob read, on
the hub's event loop), the audit events per node and round, and ratios personalized ÷ plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import common
import torch
import yaml
from round_overhead import SITES, STUDY, personal_study, study_yaml

from aipipe.node.client import HubClient
from aipipe.node.home import init_node
from aipipe.node.node import Node
from aipipe.node.worker import NodeWorker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.hub_support import Hub, running_hub  # noqa: E402
from tests.test_personal_model import _enrol  # noqa: E402

FHIR = ROOT / "examples" / "heart-disease" / "fhir"
Samples = dict[str, list[float]]


def specs(work: Path, method: str) -> dict[str, dict[str, Any]]:
    """round_overhead.py's two studies, as it writes them."""
    out = {}
    for personal in (None, method):
        spec = yaml.safe_load(study_yaml(work, 1000, "none", personal).read_text())
        out["plain" if personal is None else "personal"] = spec
    return out


def open_sites(stack: ExitStack, hub: Hub, work: Path, names: list[str]) -> dict[str, Node]:
    nodes = {}
    for name in SITES:
        paths = init_node(work / name, name, allow_non_private=True)
        client = HubClient("http://testserver", token=_enrol(hub, paths),
                           transport=hub.client._transport)  # fmt: skip
        node = stack.enter_context(Node.open(paths.home, hub=client))
        node.ingest_files([FHIR / name])
        for study in names:
            node.approve(study)
        nodes[name] = node
    return nodes


def timed_weights(worker: NodeWorker, samples: Samples, label: dict[str, str | None]) -> None:
    """Time every weights download of `worker` under `label["key"]` (none while it is None);
    the download itself still runs."""
    client = worker.client
    download = client.model_weights

    def timed(version: str) -> bytes:
        began = time.perf_counter()
        out = download(version)
        if (key := label["key"]) is not None:
            samples.setdefault(key, []).append(time.perf_counter() - began)
        return out

    client.model_weights = timed  # type: ignore[method-assign]


def one_round(
    hub: Hub, study: str, kind_of: str, workers: dict[str, NodeWorker], samples: Samples,
    nodes: dict[str, Node], keep: bool,
) -> None:  # fmt: skip
    response = hub.client.post(f"/v1/studies/{study}/rounds", json={"deadline_s": 120},
                               headers=hub.admin)  # fmt: skip
    if response.status_code != 200:
        sys.exit(f"opening a round of {study}: {response.text}")
    for kind in ("train", "evaluate"):
        for name, worker in workers.items():
            before = sum(1 for _ in nodes[name].audit.events())
            item = worker.client.work(wait_s=0)
            if item.kind != kind or item.study != study:
                sys.exit(f"{name} expected {kind} of {study}, got {item}")
            began = time.perf_counter()
            worker.handle(item)
            spent = time.perf_counter() - began
            if keep:
                samples.setdefault(f"{kind_of} {kind}", []).append(spent)
                audited = sum(1 for _ in nodes[name].audit.events()) - before
                samples.setdefault(f"{kind_of} audit events {kind}", []).append(audited)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="finetune")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per study (≥ 2)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    samples: Samples = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        studies = specs(work, args.method)
        hub = stack.enter_context(running_hub(work / "hub"))
        for spec in studies.values():
            hub.publish(spec)
        names = {"plain": STUDY, "personal": personal_study(args.method)}
        nodes = open_sites(stack, hub, work, list(names.values()))
        workers = {name: node.worker(lambda line: None) for name, node in nodes.items()}
        label: dict[str, str | None] = {"key": None}
        for worker in workers.values():
            timed_weights(worker, samples, label)
        for number in range(1, args.rounds + 1):
            for kind_of, study in names.items():
                keep = number > 1
                label["key"] = f"{kind_of} weights download" if keep else None
                one_round(hub, study, kind_of, workers, samples, nodes, keep=keep)
    medians = {key: statistics.median(values) for key, values in sorted(samples.items())}
    ratios = {
        key.removeprefix("personal "): medians[key] / medians["plain" + key[len("personal") :]]
        for key in medians
        if key.startswith("personal ") and "audit" not in key
    }
    for key, value in medians.items():
        unit = "" if "audit" in key else " ms"
        print(f"{key:40} {value if 'audit' in key else value * 1e3:8.2f}{unit}")
    for key, value in ratios.items():
        print(f"personalized ÷ plain, {key:25} {value:.2f}×")
    out = ROOT / "bench" / "results" / f"personal_round_work-{args.method}.json"
    out.write_text(json.dumps({
        "benchmark": "personal_round_work",
        "command": " ".join([".venv/bin/python", "bench/personal_round_work.py", *sys.argv[1:]]),
        "config": {"method": args.method, "rounds": args.rounds, "sites": list(SITES),
                   "timed": "rounds 2..N of each study, alternated per round"},
        "environment": common.machine(torch=torch.__version__, threads=torch.get_num_threads()),
        "median_s": medians,
        "ratio_personal_to_plain": ratios,
        "samples": samples,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
