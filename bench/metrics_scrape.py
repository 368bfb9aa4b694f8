"""Benchmark: what one Prometheus scrape of the hub's /metrics costs as its store grows.

    .venv/bin/python bench/metrics_scrape.py            # 3 sizes, 20 scrapes each
    .venv/bin/python bench/metrics_scrape.py --quick    # the smallest size only, no JSON

The counts behind /metrics are read from the hub's store at every scrape
(`aipipe.hub.metrics.StoreCollector`), so a scrape's cost grows with the store. A hub store is
filled with studies × rounds × nodes (rows written with SQL straight into its tables: the
scrape reads them the same way however they got there) and `HubMetrics.exposition()` is timed
in process, with the exposition's size; also timed, the per-process instruments' cost of one
observation (what a refused update or a CDS request adds).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((2, 50, 5), (10, 200, 20), (20, 500, 50))  # studies, rounds each, nodes


def fill(store: Any, studies: int, rounds: int, nodes: int) -> None:
    """Closed rounds in which every node reported with an ε, one model version a round."""
    conn = store.conn
    at = "2026-01-01T00:00:00.000000Z"
    with conn:
        conn.executemany(
            "INSERT INTO nodes VALUES (?, ?, ?, 'active', ?, NULL)",
            [(f"site-{n}", "00" * 32, f"cred-{n}", at) for n in range(nodes)],
        )
        for s in range(studies):
            study = f"study-{s}"
            conn.execute("INSERT INTO studies VALUES (?, 'd', '{}', ?, NULL, NULL)", (study, at))
            conn.executemany(
                "INSERT INTO rounds (study, round, state, base_version, deadline, opened_at, "
                "closed_at) VALUES (?, ?, 'closed', 'v', ?, ?, ?)",
                [(study, r, at, at, at) for r in range(1, rounds + 1)],
            )
            conn.executemany(
                "INSERT INTO round_nodes (study, round, node, status, epsilon, at) "
                "VALUES (?, ?, ?, 'reported', ?, ?)",
                [
                    (study, r, f"site-{n}", 0.01 * r, at)
                    for r in range(1, rounds + 1)
                    for n in range(nodes)
                ],
            )
            conn.executemany(
                "INSERT INTO models VALUES (?, ?, ?, NULL, ?, 'fedavg', 'b', '{}')",
                [(f"{study}-v{r}", study, r, at) for r in range(rounds + 1)],
            )


def time_scrapes(studies: int, rounds: int, nodes: int, scrapes: int) -> dict[str, Any]:
    from aipipe.hub.home import init_hub
    from aipipe.hub.metrics import HubMetrics

    with tempfile.TemporaryDirectory() as tmp:
        paths, _ = init_hub(Path(tmp) / "hub", "bench-hub")
        store = paths.open_store()
        try:
            fill(store, studies, rounds, nodes)
            metrics = HubMetrics()
            metrics.watch(store)
            size = len(metrics.exposition())  # warm: the first read pulls pages in
            times = []
            for _ in range(scrapes):
                started = time.perf_counter()
                metrics.exposition()
                times.append(time.perf_counter() - started)
        finally:
            store.close()
    return {
        "studies": studies,
        "rounds_per_study": rounds,
        "nodes": nodes,
        "round_nodes_rows": studies * rounds * nodes,
        "scrape_ms_median": statistics.median(times) * 1e3,
        "scrape_ms_max": max(times) * 1e3,
        "exposition_bytes": size,
        "scrapes_ms": [t * 1e3 for t in times],
    }


def observation_costs(calls: int = 100_000) -> dict[str, float]:
    from aipipe.hub.metrics import HubMetrics

    metrics = HubMetrics()
    started = time.perf_counter()
    for _ in range(calls):
        metrics.cds_seconds.labels("call", "patient-view", "ok").observe(0.004)
    histogram_us = (time.perf_counter() - started) / calls * 1e6
    started = time.perf_counter()
    for _ in range(calls):
        metrics.refusal("signature")
    refusal_us = (time.perf_counter() - started) / calls * 1e6
    return {"cds_observe_us": histogram_us, "refusal_us": refusal_us}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="the smallest size only, no JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    sizes = SIZES[:1] if args.quick else SIZES
    rows = [time_scrapes(*size, args.scrapes) for size in sizes]
    print(f"{'studies':>7} {'rounds':>6} {'nodes':>5} {'rows':>8} {'scrape ms':>10} {'bytes':>8}")
    for row in rows:
        print(
            f"{row['studies']:>7} {row['rounds_per_study']:>6} {row['nodes']:>5} "
            f"{row['round_nodes_rows']:>8} {row['scrape_ms_median']:>10.2f} "
            f"{row['exposition_bytes']:>8}"
        )
    costs = observation_costs()
    print(
        f"per observation: CDS histogram {costs['cds_observe_us']:.2f} µs, "
        f"refusal (count by its typed category) {costs['refusal_us']:.2f} µs"
    )
    out = args.out or (None if args.quick else ROOT / "bench" / "results" / "metrics_scrape.json")
    if out is not None:
        result = {
            "benchmark": "metrics_scrape",
            "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
            "machine": common.machine(),
            "rows": rows,
            "observations": costs,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
