"""Benchmark: what secure aggregation costs per round through real hub and node processes.

    .venv/bin/python bench/secure_rounds.py            # 20 rounds × 5 repeats per mode, ~3 min
    .venv/bin/python bench/secure_rounds.py --quick    # 4 rounds × 1 repeat: a smoke run
    .venv/bin/python bench/secure_rounds.py --report bench/results/secure_rounds.json

Writes bench/results/secure_rounds.json (`-quick` suffix for a quick run). bench/secure_agg.py
times the primitives in one process; this script times the wiring: the same rounds through
`aipipe hub serve` and 4 × `aipipe node start` on 127.0.0.1, with `secure: none | secagg |
ckks` and nothing else changed.

Set-up (bench/round_overhead.py's, reused): one hub, the 4 UCI heart-disease sites enrolled
with their own FHIR data, `allow_non_private: true` on every node; three studies published that
differ only in `name` and `secure` (the shipped study with `local_steps: 1`, `privacy: none`,
`min_nodes: 3`, `round_deadline_s: 120`), every node approves all three. The hub and the 4 node
daemons start once; then, per repeat, `aipipe train run --study S --rounds N --json` runs for
each mode in turn, the order rotating between repeats so that load from other processes on the
2 shared cores hits the modes alike.

What is timed, per round (the hub's own microsecond stamps, as in round_overhead.py):

- `closed`: round opened → new global model aggregated (`rounds.opened_at` → `closed_at`).
- `+eval`: round opened → the last site's evaluation of the new model in (last `metrics.at`).
- `cycle`: round opened → next round opened, the wall time per round `train run` gives a user.

Round 1 of every repeat is left out of the medians (for CKKS, round 1 of the first repeat is
also the key ceremony: the designated node makes the TenSEAL context and seals it to the other
three through the hub, and they open it on their first round; it is reported on its own), and
for `cycle` the last round of each repeat. SecAgg+ stage closings and the CKKS ceremony and
collection come from the hub's audit log (`round.stage` events).

Bytes and HTTP calls are counted on the nodes: each daemon runs with `httpx.Client.request`
wrapped to append one JSON line per call (method, path, start and end time, status, request
and response body and header sizes) to `<work>/meter/<site>.jsonl`; the wrapper costs a
`json.dumps` and a line write per call, in every mode alike. The update frame a node uploads is
the body of its `POST …/rounds/N/updates`: signed header + payload, where the payload is a
safetensors float32 delta (`none`), the masked fixed-point vector (`secagg`) or the serialised
CKKS ciphertext (`ckks`). A call counts to the round its path names, or else (`/v1/work`, model
weights, the keyring, metrics) to the round whose [opened, next opened) window holds its end.

Every process runs from a copy of aipipe/ taken when the script starts (`<work>/src`, its
digest in the JSON beside the commit), so that edits to the working tree during a run cannot
mix versions between the hub, the nodes and `train run`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import common
import yaml
from rich.table import Table
from round_overhead import (
    DATA,
    ROOT,
    SITES,
    AipipeSite,
    Processes,
    aipipe,
    aipipe_breakdown,
    console,
    free_port,
    nodes_polling,
    p90,
    per_round,
    processes,
    start_hub,
    utc_now,
    wait_until,
)

MODES = ("none", "secagg", "ckks")
Results = dict[str, list[dict[str, Any]]]  # mode → one run per repeat
METER_ENV = "AIPIPE_BENCH_METER"
# Run in each node daemon before the CLI: one JSON line per HTTP call the node makes.
METER = """
import json, os, time, httpx
_meter = open(os.environ["AIPIPE_BENCH_METER"], "a", buffering=1)
_send = httpx.Client.request
def _metered(self, method, url, **kwargs):
    began = time.time()
    response = _send(self, method, url, **kwargs)
    ended = time.time()
    request = response.request
    record = {
        "method": request.method, "path": request.url.path, "t0": began, "t1": ended,
        "status": response.status_code, "up": len(request.content),
        "down": len(response.content),
        "up_headers": sum(len(k) + len(v) + 4 for k, v in request.headers.raw),
        "down_headers": sum(len(k) + len(v) + 4 for k, v in response.headers.raw),
    }
    if request.url.path.endswith("/updates"):  # aipipe frame: magic, u32 header length, ...
        header = int.from_bytes(request.content[4:8], "little")
        record["payload"] = len(request.content) - 8 - header
    _meter.write(json.dumps(record) + "\\n")
    return response
httpx.Client.request = _metered
from aipipe.cli.app import main
main()
"""
# Calls that wait on the hub (long-polls) rather than carry work.
WAITS = ("work", "secagg/neighbour-keys", "secagg/forwarded-shares", "secagg/unmask-request")


def study_name(mode: str) -> str:
    return f"secure-rounds-{mode}"


# -- set-up -------------------------------------------------------------------------------------


def study_yaml(work: Path, mode: str, rounds: int) -> Path:
    """The shipped study, one local step, no DP, `min_nodes: 3`, `secure: <mode>`."""
    spec = yaml.safe_load((DATA / "study.yaml").read_text())
    spec["name"] = study_name(mode)
    spec["training"].update(local_steps=1, rounds=rounds)
    spec["privacy"] = {"mode": "none"}
    spec["secure"] = mode
    spec["min_nodes"] = 3
    spec["round_deadline_s"] = 120
    path = work / f"study-{mode}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def setup(work: Path, rounds: int) -> AipipeSite:
    """Hub, 4 enrolled nodes with their own FHIR data, the three studies published and approved."""
    hub_home = work / "hub"
    token = json.loads(aipipe("hub", "init", "--home", str(hub_home), "--name", "bench", "--json"))
    studies = [study_yaml(work, mode, rounds) for mode in MODES]
    site = AipipeSite(work, hub_home, token["admin_token"], free_port(), studies[0])
    env = {**os.environ, "AIPIPE_TOKEN": site.token}
    with processes(work) as group:
        env["AIPIPE_HUB_URL"] = start_hub(group, site, [])
        for name in SITES:
            out = aipipe("hub", "enrol-token", "--home", str(hub_home), "--node", name, "--json")
            home = str(work / name)
            enrol_env = {**env, "AIPIPE_ENROL_TOKEN": json.loads(out)["token"]}
            aipipe("node", "init", "--home", home, "--name", name, "--json", env=enrol_env)
            aipipe("node", "ingest", "--home", home, str(DATA / "fhir" / name), "--json")
            config = work / name / "node.yaml"
            raw = yaml.safe_load(config.read_text())
            config.write_text(yaml.safe_dump({**raw, "allow_non_private": True}))
        for path in studies:
            aipipe("study", "publish", str(path), "--json", env=env)
        for name in SITES:
            for mode in MODES:
                home = str(work / name)
                aipipe("node", "approve", study_name(mode), "--home", home, "--json", env=env)
    return site


def start_nodes(group: Processes, site: AipipeSite, poll: float) -> None:
    meters = site.work / "meter"
    meters.mkdir(exist_ok=True)
    for name in SITES:
        env = {**os.environ, METER_ENV: str(meters / f"{name}.jsonl")}
        command = ["node", "start", "--home", str(site.work / name), "--poll", str(poll)]
        group.start(name, [sys.executable, "-c", METER, *command], env)


# -- one `train run` ----------------------------------------------------------------------------


class RoundsFailedError(RuntimeError):
    """A `train run` failed, hung or left a round unclosed: the finding, with the logs."""


def run_mode(site: AipipeSite, env: dict[str, str], mode: str, rounds: int) -> dict[str, Any]:
    study = study_name(mode)
    since = utc_now()
    command = ["-m", "aipipe", "train", "run", "--study", study, "--rounds", str(rounds), "--json"]
    began, t0 = time.monotonic(), time.time()
    try:
        out = subprocess.run(
            [sys.executable, *command],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=60 + 150 * rounds,
        )
    except subprocess.TimeoutExpired as exc:
        raise RoundsFailedError(f"`train run --study {study}` hung: {exc}") from exc
    wall, ended = time.monotonic() - began, time.time()
    timeline = hub_timeline(site.hub_home / "hub.sqlite", study, since)
    if out.returncode != 0 or len(timeline) != rounds:
        raise RoundsFailedError(
            f"`train run --study {study}` exited {out.returncode} after {len(timeline)} of "
            f"{rounds} rounds:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    unclosed = {k: r for k, r in timeline.items() if r["state"] != "closed"}
    if unclosed:
        raise RoundsFailedError(f"rounds of {study} not closed: {unclosed}")
    evaluated = {k: len(r["evals_at"]) for k, r in timeline.items()}
    if min(evaluated.values()) < len(SITES):
        raise RoundsFailedError(f"rounds of {study} lack evaluations (round: count): {evaluated}")
    stages = stage_times(site.hub_home / "audit.sqlite", study, since)
    for number, row in timeline.items():
        row["stages"] = stages.get(number, {})
    return {"rounds": timeline, "command_wall_s": wall, "t0": t0, "t1": ended}


def _ts(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def hub_timeline(db: Path, study: str, since: str) -> dict[str, dict[str, Any]]:
    """Rounds of `study` opened after `since`: opened, closed, each update's and evaluation's
    arrival (round_overhead.hub_timeline, for any study)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        timeline: dict[str, dict[str, Any]] = {}
        query = (
            "SELECT round, opened_at, closed_at, result_version, state, reason FROM rounds "
            "WHERE study = ? AND opened_at > ? ORDER BY round"
        )
        for number, opened, closed, version, state, reason in conn.execute(query, (study, since)):
            updates = conn.execute(
                "SELECT at FROM round_nodes WHERE study = ? AND round = ? AND status = 'reported'",
                (study, number),
            ).fetchall()
            evals = conn.execute("SELECT at FROM metrics WHERE version = ?", (version,)).fetchall()
            timeline[str(number)] = {
                "state": state,
                "reason": reason,
                "version": version,
                "start": _ts(opened),
                "closed": _ts(closed) if closed else None,
                "metrics": max(_ts(e[0]) for e in evals) if evals else None,
                "updates_at": sorted(_ts(u[0]) for u in updates if u[0]),
                "evals_at": sorted(_ts(e[0]) for e in evals),
            }
        return timeline
    finally:
        conn.close()


def stage_times(db: Path, study: str, since: str) -> dict[str, dict[str, float]]:
    """round → {stage: when the hub closed it}, from the hub's `round.stage` audit events."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT time, resource, details FROM events WHERE action = 'round.stage' "
            "AND resource LIKE ? AND time > ?",
            (f"study/{study}/round/%", since),
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for stamp, resource, details in rows:
        out[resource.rsplit("/", 1)[1]][json.loads(details)["stage"]] = _ts(stamp)
    return dict(out)


# -- node-side HTTP meter -----------------------------------------------------------------------


def call_kind(method: str, path: str) -> str:
    """A short name for a node's call: `upload`, `secagg/advert`, `ckks/sum`, …"""
    parts = path.strip("/").split("/")
    if parts[:2] == ["v1", "work"]:
        return "work"
    if parts[:2] == ["v1", "keyring"]:
        return "keyring"
    if parts[:2] == ["v1", "models"]:
        return "weights" if parts[-1] == "weights" else "metrics" if method == "POST" else "model"
    if len(parts) >= 4 and parts[3] == "ckks":  # /v1/studies/S/ckks/keys
        return f"ckks/keys {method}"
    if len(parts) >= 6 and parts[3] == "rounds":
        tail = "/".join(parts[5:])
        return "upload" if tail == "updates" else tail
    if len(parts) == 5 and parts[3] == "rounds":
        return "round"
    return "study" if len(parts) == 3 else parts[-1]


def owner(path: str, versions: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(study, round) a call's path names: a round, or the model version a round made."""
    parts = path.strip("/").split("/")
    if len(parts) >= 5 and parts[:2] == ["v1", "studies"] and parts[3] == "rounds":
        return parts[2], parts[4]
    if len(parts) == 4 and parts[1] == "models" and parts[3] == "metrics":
        return versions.get(parts[2])
    return None


def node_traffic(
    results: dict[str, list[dict[str, Any]]], meters: dict[str, list[dict[str, Any]]]
) -> None:
    """Add each round's per-node HTTP calls to `results` (run["rounds"][n]["nodes"]).

    A call belongs to the round its path names (a metrics report: the round that made the
    model, whose report may land after the next round opened), else to the round whose
    [opened, next opened) window holds the call's end."""
    windows = []
    for mode, runs in results.items():
        for run in runs:
            numbers = sorted(run["rounds"], key=int)
            for i, number in enumerate(numbers):
                row = run["rounds"][number]
                end = run["rounds"][numbers[i + 1]]["start"] if i + 1 < len(numbers) else run["t1"]
                row["end"] = end
                row["nodes"] = {site: [] for site in SITES}
                windows.append((row["start"], end, study_name(mode), number, row))
    by_round = {(study, number): row for _, _, study, number, row in windows}
    versions = {w[4]["version"]: (w[2], w[3]) for w in windows if w[4].get("version")}
    for site, calls in meters.items():
        for call in calls:
            named = owner(call["path"], versions)
            if named is not None:
                row = by_round.get(named)
            else:
                row = next((w[4] for w in windows if w[0] <= call["t1"] < w[1]), None)
            if row is None:
                continue  # between runs (idle polls), set-up, or another study
            kind = call_kind(call["method"], call["path"])
            began = max(call["t0"], row["start"]) if kind == "work" else call["t0"]
            row["nodes"][site].append(
                {
                    "kind": kind,
                    "status": call["status"],
                    "t0": began,
                    "t1": call["t1"],
                    "up": call["up"],
                    "down": call["down"],
                    "headers": call["up_headers"] + call["down_headers"],
                    **({"payload": call["payload"]} if "payload" in call else {}),
                }
            )
    for _, end, _, _, row in windows:
        for site, made in row["nodes"].items():
            made.sort(key=lambda c: c["t0"])
            row["nodes"][site] = node_round(made, end - row["start"])


def read_meters(work: Path) -> dict[str, list[dict[str, Any]]]:
    meters = {}
    for site in SITES:
        path = work / "meter" / f"{site}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        meters[site] = [json.loads(line) for line in lines if line.strip()]
    return meters


# -- figures ------------------------------------------------------------------------------------


def timed_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Rounds 2..N of a run (round 1 is warm-up, and the CKKS key ceremony)."""
    return [run["rounds"][k] for k in sorted(run["rounds"], key=int)[1:]]


def node_round(made: list[dict[str, Any]], window: float) -> dict[str, Any]:
    """One node's round from its calls: bytes, calls by kind and status, seconds in each kind
    of call, and the local work before each kind of call (the gap since the node's previous
    call: what produced the request — training and encryption before an upload, evaluation
    before a metrics report — or a wait for one of the 2 cores)."""
    inside: dict[str, float] = defaultdict(float)
    before: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for previous, call in zip([None, *made[:-1]], made, strict=True):
        inside[call["kind"]] += call["t1"] - call["t0"]
        sizes[call["kind"]][0] += call["up"]
        sizes[call["kind"]][1] += call["down"]
        counts[f"{call['kind']} {call['status']}"] += 1
        if previous is not None:
            before[call["kind"]] += max(call["t0"] - previous["t1"], 0.0)
    upload = next((c for c in made if c["kind"] == "upload"), None)
    return {
        "calls": len(made),
        "up": sum(c["up"] for c in made),
        "down": sum(c["down"] for c in made),
        "headers": sum(c["headers"] for c in made),
        "frame": upload["up"] if upload else None,
        "payload": upload.get("payload") if upload else None,
        "upload_at": upload["t1"] if upload else None,
        "in_call_s": {k: round(v, 5) for k, v in inside.items()},
        "before_call_s": {k: round(v, 5) for k, v in before.items()},
        "counts": dict(counts),
        "bytes_up_down": dict(sizes),
        "outside_calls_s": round(max(window - sum(inside.values()), 0.0), 5),
    }


def node_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over node-rounds of `node_round`'s figures (a kind absent in a round counts 0)."""
    rounds = [made for row in rows for made in row["nodes"].values()]
    kinds = sorted({k for r in rounds for k in r["in_call_s"]})
    median = statistics.median

    def med(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return median(values) if values else None

    return {
        "calls_per_node": med("calls"),
        "up_bytes_per_node": med("up"),
        "down_bytes_per_node": med("down"),
        "http_header_bytes_per_node": med("headers"),
        "update_frame_bytes": med("frame"),
        "update_payload_bytes": med("payload"),
        "in_call_s": {k: median([r["in_call_s"].get(k, 0.0) for r in rounds]) for k in kinds},
        "local_before_call_s": {
            k: median([r["before_call_s"].get(k, 0.0) for r in rounds]) for k in kinds
        },
        "outside_calls_s": med("outside_calls_s"),
        "calls_by_kind_per_round": _calls_by_kind(rows),
    }


def _calls_by_kind(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median number of calls of each kind and status per round, all 4 nodes together."""
    totals = []
    for row in rows:
        total: dict[str, int] = defaultdict(int)
        for made in row["nodes"].values():
            for key, n in made["counts"].items():
                total[key] += n
        totals.append(total)
    kinds = sorted({k for total in totals for k in total})
    return {k: statistics.median([t.get(k, 0) for t in totals]) for k in kinds}


def stage_figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds from round opened to each stage's close (hub audit stamps)."""
    found: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for stage, at in row.get("stages", {}).items():
            found[f"open→{stage} closed"].append(at - row["start"])
    return {k: statistics.median(v) for k, v in found.items()}


def ceremony(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The CKKS study's first round (the key ceremony), beside round 1 of the later repeats."""
    first = [r for r in runs if r["repeat"] == 0]
    if not first:
        return None
    rows = first[0]["rounds"]
    numbers = sorted(rows, key=int)
    row = rows[numbers[0]]
    later = [run["rounds"][sorted(run["rounds"], key=int)[0]] for run in runs if run["repeat"]]
    out: dict[str, Any] = {
        "round": int(numbers[0]),
        "closed_s": row["closed"] - row["start"],
        "cycle_s": rows[numbers[1]]["start"] - row["start"] if len(numbers) > 1 else None,
        "keys_posted_s": row.get("stages", {}).get("keys", row["start"]) - row["start"],
        "round1_later_repeats_closed_s": [r["closed"] - r["start"] for r in later],
    }
    if "nodes" in row:
        nodes = row["nodes"]
        out["keygen_and_seal_local_s"] = max(
            r["before_call_s"].get("ckks/keys POST", 0.0) for r in nodes.values()
        )
        out["open→upload_s"] = {
            site: r["upload_at"] - row["start"] for site, r in nodes.items() if r["upload_at"]
        }
        keygen = [r for r in nodes.values() if "ckks/keys POST" in r["in_call_s"]]
        out["keys_post_bytes"] = keygen[0]["bytes_up_down"]["ckks/keys POST"][0] if keygen else None
    return out


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for mode, runs in results.items():
        pooled: dict[str, list[float]] = {"closed": [], "metrics": [], "cycle": []}
        for run in runs:
            for key, values in per_round(run).items():
                pooled[key] += values
        row: dict[str, Any] = {
            f"{key}_{stat}": fn(values)
            for key, values in pooled.items()
            for stat, fn in (("median_s", statistics.median), ("p90_s", p90))
        }
        row["rounds_timed"] = len(pooled["closed"])
        row["cycle_median_by_repeat_s"] = [median_cycle(run) for run in runs]
        parts: dict[str, list[float]] = defaultdict(list)
        for run in runs:
            for key, values in aipipe_breakdown(run).items():
                parts[key] += values
        row["hub_breakdown_median_s"] = {k: statistics.median(v) for k, v in parts.items()}
        rows = [r for run in runs for r in timed_rows(run)]
        row["stages_median_s"] = stage_figures(rows)
        if all("nodes" in r for r in rows):
            row["nodes"] = node_figures(rows)
        if mode == "ckks":
            row["key_ceremony"] = ceremony(runs)
        summary[mode] = row
    _ratios(summary, results)
    return summary


def _ratios(summary: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> None:
    """Each mode ÷ `none`: of the pooled medians, and per repeat (the same minutes)."""
    if "none" not in summary:
        return
    base = summary["none"]
    for mode, row in summary.items():
        row["ratio_to_none"] = {
            key: row[f"{key}_median_s"] / base[f"{key}_median_s"]
            for key in ("cycle", "closed", "metrics")
        }
        row["cycle_ratio_by_repeat"] = [
            median_cycle(run) / median_cycle(plain)
            for run, plain in zip(results[mode], results["none"], strict=False)
        ]


def median_cycle(run: dict[str, Any]) -> float:
    return statistics.median(per_round(run)["cycle"])


# -- tables -------------------------------------------------------------------------------------


def _cell(value: float | None, form: str = "{:.3f}") -> str:
    return "–" if value is None else form.format(value)


def table(summary: dict[str, dict[str, Any]]) -> Table:
    out = Table(title="seconds per round, hub + 4 node processes on loopback (rounds 2..N)")
    columns = ("secure", "rounds", "cycle med", "cycle p90", "closed med", "+eval med",
               "cycle ÷ none", "closed ÷ none", "cycle ÷ none, by repeat")  # fmt: skip
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for mode, row in summary.items():
        ratio = row.get("ratio_to_none", {})
        out.add_row(
            mode,
            str(row["rounds_timed"]),
            *(_cell(row[f"{k}_{s}_s"]) for k, s in
              (("cycle", "median"), ("cycle", "p90"), ("closed", "median"), ("metrics", "median"))),
            *(_cell(ratio.get(k), "{:.2f}×") for k in ("cycle", "closed")),
            "/".join(f"{v:.2f}" for v in row.get("cycle_ratio_by_repeat", [])) or "–",
        )  # fmt: skip
    out.caption = (
        "cycle = round opened → next round opened (what `train run` takes per round); closed = "
        "opened → new model aggregated; +eval = opened → last site's evaluation in. Medians "
        "pooled over repeats; ratios to `none` from the same run."
    )
    return out


def bytes_table(summary: dict[str, dict[str, Any]]) -> Table:
    out = Table(title="what one node sends and receives per round (HTTP bodies, medians)")
    columns = ("secure", "update frame B", "of it payload B", "all up B", "all down B",
               "HTTP headers B", "calls")  # fmt: skip
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    keys = ("update_frame_bytes", "update_payload_bytes", "up_bytes_per_node",
            "down_bytes_per_node", "http_header_bytes_per_node", "calls_per_node")  # fmt: skip
    for mode, row in summary.items():
        nodes = row.get("nodes", {})
        out.add_row(mode, *(_cell(nodes.get(k), "{:,.0f}") for k in keys))
    out.caption = (
        "update frame = the body of POST …/updates (signed header + payload: safetensors float32 "
        "delta, masked fixed-point vector, CKKS ciphertext); all up/down = every request/response "
        "body of the node's round; headers = request + response headers, both ways."
    )
    return out


def breakdown_table(summary: dict[str, dict[str, Any]]) -> Table:
    out = Table(title="where a round goes, hub stamps (median s)")
    out.add_column("interval")
    for mode in summary:
        out.add_column(mode, justify="right")
    keys: list[str] = []
    for row in summary.values():
        for key in [*row["hub_breakdown_median_s"], *row["stages_median_s"]]:
            if key not in keys:
                keys.append(key)
    for key in keys:
        out.add_row(
            key,
            *(_cell(r["hub_breakdown_median_s"].get(key, r["stages_median_s"].get(key)))
              for r in summary.values()),
        )  # fmt: skip
    out.caption = "stage closings from the hub's `round.stage` audit events"
    return out


def calls_table(summary: dict[str, dict[str, Any]]) -> Table:
    out = Table(title="a node's round by HTTP call: s in the call / s of local work before it "
                "(medians per node-round), (calls per round, all 4 nodes)")  # fmt: skip
    out.add_column("call")
    for mode in summary:
        out.add_column(mode, justify="right")
    kinds = sorted({k for r in summary.values() for k in r["nodes"]["in_call_s"]})
    for kind in kinds:
        cells = []
        for row in summary.values():
            nodes = row["nodes"]
            if kind not in nodes["in_call_s"]:
                cells.append("–")
                continue
            counts = [f"{v:g}" if status == "200" else f"{v:g}×{status}"
                      for k, v in nodes["calls_by_kind_per_round"].items()
                      for name, status in [k.rsplit(" ", 1)] if name == kind and v]  # fmt: skip
            cells.append(
                f"{nodes['in_call_s'][kind]:.3f} / {nodes['local_before_call_s'][kind]:.3f} "
                f"({' + '.join(counts) or '0'})"
            )
        out.add_row(kind + (" (long-poll)" if kind in WAITS else ""), *cells)
    out.add_row(
        "round minus time in calls",
        *(f"{r['nodes']['outside_calls_s']:.3f}" for r in summary.values()),
    )
    return out


def print_tables(summary: dict[str, dict[str, Any]]) -> None:
    console.print(table(summary))
    console.print(breakdown_table(summary))
    if all("nodes" in r for r in summary.values()):
        console.print(bytes_table(summary))
        console.print(calls_table(summary))
    cer = summary.get("ckks", {}).get("key_ceremony")
    if cer:
        later = "/".join(f"{v:.3f}" for v in cer["round1_later_repeats_closed_s"])
        uploads = cer.get("open→upload_s", {})
        console.print(
            f"ckks key ceremony (round {cer['round']}): closed {cer['closed_s']:.3f} s, cycle "
            f"{_cell(cer['cycle_s'])} s; keys posted {cer['keys_posted_s']:.3f} s after opening "
            f"(keygen + sealing on the node {_cell(cer.get('keygen_and_seal_local_s'))} s, "
            f"{_cell(cer.get('keys_post_bytes'), '{:,.0f}')} B posted); "
            "ciphertexts in after "
            f"{'/'.join(f'{v:.3f}' for v in uploads.values()) or '–'} s ({'/'.join(uploads)})"
            + (f"; round 1 of later repeats closed in {later} s" if later else "")
        )


# -- main ---------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import tenseal
    import torch

    import aipipe

    return common.machine(
        aipipe=aipipe.__version__,
        torch=torch.__version__,
        tenseal=getattr(tenseal, "__version__", "?"),
    )


def snapshot(work: Path) -> str:
    """Run every process from a copy of aipipe/ taken now, so that edits made to the working
    tree during the run cannot mix versions; returns a digest of the copied sources."""
    target = work / "src" / "aipipe"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT / "aipipe", target, ignore=shutil.ignore_patterns("__pycache__"))
    os.environ["PYTHONPATH"] = str(target.parent)
    sys.path.insert(0, str(target.parent))
    digest = hashlib.sha256()
    for path in sorted(target.rglob("*.py")):
        digest.update(path.relative_to(target).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds per repeat (≥ 3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--poll", type=float, default=10.0, help="node start --poll (seconds)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--quick", action="store_true", help="4 rounds, 1 repeat")
    parser.add_argument("--report", type=Path, help="re-summarise a results file and print it")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    if args.quick:
        args.rounds, args.repeats = 4, 1
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES) or args.rounds < 3:
        parser.error(f"modes are {', '.join(MODES)}; --rounds must be ≥ 3")
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="secure-rounds-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    source = snapshot(work)
    os.chdir(work)  # `python -m` puts the working directory first on sys.path
    env = {**environment(), "aipipe_source_sha256": source}
    try:
        results = run_all(args, modes, work)
    except RoundsFailedError as exc:
        console.print(f"[red]secure rounds failed:[/] {exc}")
        show_logs(work)
        sys.exit(f"see the logs in {work}")
    summary = summarise(results)
    print_tables(summary)
    env["load_average_at_end"] = os.getloadavg()
    write_results(args, modes, env, summary, results, work)
    console.print(f"finished in {time.monotonic() - started:.0f} s; files in {work}")


def report(path: Path) -> None:
    """Re-summarise a results file's timings and print its tables. The per-node figures are
    kept as stored: the results file holds the hub's timelines, not every node's calls (those
    are in `<work>/secure_rounds-full.json` and `<work>/meter/`)."""
    payload = json.loads(path.read_text())
    stored = payload["summary"]
    summary = summarise(payload["runs"])
    for mode, row in summary.items():
        if "nodes" in stored.get(mode, {}):
            row["nodes"] = stored[mode]["nodes"]
        if row.get("key_ceremony") and stored.get(mode, {}).get("key_ceremony"):
            row["key_ceremony"] = {**stored[mode]["key_ceremony"], **row["key_ceremony"]}
    payload["summary"] = summary
    print_tables(summary)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def run_all(args: argparse.Namespace, modes: list[str], work: Path) -> Results:
    study_rounds = args.rounds * args.repeats + 10
    console.rule(f"setup in {work}")
    site = setup(work, study_rounds)
    env = {**os.environ, "AIPIPE_TOKEN": site.token}
    results: Results = {mode: [] for mode in modes}
    with processes(work) as group:
        env["AIPIPE_HUB_URL"] = start_hub(group, site, [])
        since = utc_now()
        start_nodes(group, site, args.poll)
        wait_until(lambda: nodes_polling(env, since), "4 node daemons polling the hub")
        for repeat in range(args.repeats):
            order = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
            for mode in order:
                run = run_mode(site, env, mode, args.rounds)
                run["repeat"] = repeat
                results[mode].append(run)
                cycle = median_cycle(run)
                console.print(
                    f"repeat {repeat + 1} {mode:7} median cycle {cycle:.3f} s/round, "
                    f"train run {run['command_wall_s']:.1f} s"
                )
    node_traffic(results, read_meters(work))
    return results


def show_logs(work: Path, lines: int = 40) -> None:
    for name in ("hub", *SITES):
        log = work / f"{name}.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            console.rule(f"{log}")
            console.print("\n".join(tail), markup=False, highlight=False)


def write_results(
    args: argparse.Namespace,
    modes: list[str],
    env: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    results: dict[str, list[dict[str, Any]]],
    work: Path,
) -> None:
    name = "secure_rounds-quick" if args.quick else "secure_rounds"
    path = ROOT / "bench" / "results" / f"{name}.json"
    payload = {
        "benchmark": "secure_rounds",
        "command": " ".join([".venv/bin/python", "bench/secure_rounds.py", *sys.argv[1:]]),
        "config": {
            "rounds": args.rounds,
            "repeats": args.repeats,
            "modes": modes,
            "sites": list(SITES),
            "model": "logistic 13→1 (the shipped heart-disease study)",
            "training": {
                **yaml.safe_load((DATA / "study.yaml").read_text())["training"],
                "local_steps": 1,
                "rounds": "rounds × repeats + 10 (declared; no DP budget to spend)",
            },
            "privacy": "none (allow_non_private on every node)",
            "min_nodes": 3,
            "node_poll_s": args.poll,
            "excluded": "process start-up, set-up, round 1 of each repeat (reported apart for "
            "the CKKS key ceremony), and for cycle the last round",
        },
        "environment": env,
        "summary": summary,
        "runs": results,
    }
    full = work / "secure_rounds-full.json"  # with every node's rounds
    full.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    payload["runs"] = {
        mode: [
            {**run, "rounds": {n: _without(r, "nodes") for n, r in run["rounds"].items()}}
            for run in runs
        ]
        for mode, runs in results.items()
    }
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    console.print(f"wrote {path.relative_to(ROOT)}")


def _without(row: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != key}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
