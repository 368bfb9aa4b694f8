"""Benchmark: the hub's aggregation time of the robust aggregators against streaming FedAvg.

    .venv/bin/python bench/robust_aggregation.py            # 12 nodes × 1e5 parameters, 11 repeats
    .venv/bin/python bench/robust_aggregation.py --repeats 5 --nodes 12 --size 100000

One process, no network, no codec: what is timed is the aggregator's own work for one round,
`begin(global)`, `accumulate(delta, n)` for each node's float32 delta, then `finalize()`, as the
hub runs it (`aipipe.hub.rounds.plain`: FedAvg folds each update as it arrives, a robust
aggregator keeps them and works at the end). Settings are those for a third of 12 sites
malicious: trimmed mean β = 1/3 (4 per side), Krum f = 4, multi-Krum f = 4 and m = n − f = 8,
centred clipping τ = 1 with L = 1 and L = 3 iterations.

Columns: accumulate ms (all nodes), finalize ms, hub ms (their sum: the whole round), and hub ×,
the ratio to FedAvg's hub time in the same repeat; CPU ms / CPU × are the process's CPU time
for the same round (`time.process_time`: time preempted by other work on a shared machine is
not counted, BLAS threads are). "path ms" / "path ×" add the tensor codec
work the plain round protocol does around the aggregator (not the store, HTTP or signatures):
FedAvg decodes each update, resumes its fold from the round's saved state (decode +
`set_state`), accumulates and saves the state again (`get_state` + encode), then resumes once
more to finalize; a robust aggregator decodes each update on arrival (verification), and at the
end decodes the base model and every kept update again, accumulates them and finalizes.

Each repeat times every aggregator 3 times on the same updates and keeps the fastest (on a
shared machine the slower ones were preempted); repeats rotate which aggregator goes first, and
the table gives medians over repeats. Target (issue 14): robust ≤ 1.5×
FedAvg's hub time at 12 sites × 1e5 parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from secure_agg import machine

from aipipe.aggregation import Aggregator, make_aggregator
from aipipe.wire.tensors import decode_arrays, encode_arrays

TARGET = 1.5
INNER = 3  # each repeat keeps the fastest of this many rounds: a preempted one is not the cost


def contenders(nodes: int) -> dict[str, Callable[[], Aggregator]]:
    """Label → a fresh aggregator with the settings for a third of `nodes` malicious."""
    third = nodes // 3
    return {
        "fedavg": lambda: make_aggregator("fedavg"),
        "trimmed_mean β=1/3": lambda: make_aggregator("trimmed_mean", trim=third / nodes + 1e-9),
        "median": lambda: make_aggregator("median"),
        f"krum f={third}": lambda: make_aggregator("krum", byzantine=third),
        f"multi-krum f={third} m={nodes - third}": lambda: make_aggregator(
            "krum", byzantine=third, multi=nodes - third
        ),
        "centered_clip τ=1 L=1": lambda: make_aggregator("centered_clip", iterations=1),
        "centered_clip τ=1 L=3": lambda: make_aggregator("centered_clip", iterations=3),
    }


def model(size: int, rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    """A two-array model of `size` parameters (a weight matrix and a bias), float32."""
    bias = min(100, size)
    weight = rng.normal(0.0, scale, size - bias).astype(np.float32)
    return {"layer.weight": weight, "layer.bias": rng.normal(0.0, scale, bias).astype(np.float32)}


def one_round(
    make: Callable[[], Aggregator], base: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]]
) -> tuple[float, float, float]:
    """(accumulate seconds, finalize seconds, CPU seconds of both) of one round."""
    aggregator = make()
    cpu, start = time.process_time(), time.perf_counter()
    aggregator.begin(base)
    for delta in deltas:
        aggregator.accumulate(delta, 100)
    folded = time.perf_counter()
    aggregator.finalize()
    end = time.perf_counter()
    return folded - start, end - folded, time.process_time() - cpu


def hub_path(make: Callable[[], Aggregator], base_blob: bytes, payloads: list[bytes]) -> float:
    """Seconds of one round through the plain protocol's codec work (see the module doc)."""
    start = time.perf_counter()
    if not make().requires_individual_updates:
        state: bytes | None = None
        for payload in payloads:
            delta, aggregator = decode_arrays(payload), make()
            if state is None:
                aggregator.begin(decode_arrays(base_blob))
            else:
                aggregator.set_state(decode_arrays(state))
            aggregator.accumulate(delta, 100)
            saved = aggregator.get_state()
            state = encode_arrays({k: v.astype(np.float64, copy=False) for k, v in saved.items()})
        assert state is not None
        aggregator = make()
        aggregator.set_state(decode_arrays(state))
    else:
        for payload in payloads:
            decode_arrays(payload)  # verified on arrival, then kept as a blob
        aggregator = make()
        aggregator.begin(decode_arrays(base_blob))
        for payload in payloads:
            aggregator.accumulate(decode_arrays(payload), 100)
    aggregator.finalize()
    return time.perf_counter() - start


Sample = tuple[float, float, float, float]
"""(accumulate, finalize, CPU of both, protocol path) seconds of one repeat."""


def measure(size: int, nodes: int, repeats: int) -> dict[str, Any]:
    makers = contenders(nodes)
    labels = list(makers)
    runs: dict[str, list[Sample]] = {label: [] for label in labels}
    for rep in range(repeats):
        rng = np.random.default_rng(rep)
        base = model(size, rng, 0.1)
        deltas = [model(size, rng, 0.01) for _ in range(nodes)]
        base_blob, payloads = encode_arrays(base), [encode_arrays(d) for d in deltas]
        order = labels[rep % len(labels) :] + labels[: rep % len(labels)]
        for label in order:
            print(f"  {label:<28} repeat {rep + 1}", file=sys.stderr)
            rounds = [one_round(makers[label], base, deltas) for _ in range(INNER)]
            accumulate, finalize, cpu = (min(r[i] for r in rounds) for i in range(3))
            path = min(hub_path(makers[label], base_blob, payloads) for _ in range(INNER))
            runs[label].append((accumulate, finalize, cpu, path))
    return summarise(runs)


def summarise(runs: dict[str, list[Sample]]) -> dict[str, Any]:
    base_hub = [a + f for a, f, _, _ in runs["fedavg"]]
    base_cpu = [c for _, _, c, _ in runs["fedavg"]]
    base_path = [p for _, _, _, p in runs["fedavg"]]
    out: dict[str, Any] = {}
    for label, items in runs.items():
        hub = [a + f for a, f, _, _ in items]
        cpu = [c for _, _, c, _ in items]
        path = [p for _, _, _, p in items]
        out[label] = {
            "accumulate_ms": statistics.median(a for a, _, _, _ in items) * 1e3,
            "finalize_ms": statistics.median(f for _, f, _, _ in items) * 1e3,
            "hub_ms": statistics.median(hub) * 1e3,
            "hub_ratio": _ratio(hub, base_hub),
            "cpu_ms": statistics.median(cpu) * 1e3,
            "cpu_ratio": _ratio(cpu, base_cpu),
            "path_ms": statistics.median(path) * 1e3,
            "path_ratio": _ratio(path, base_path),
            "runs_hub_ms": [h * 1e3 for h in hub],
            "runs_cpu_ms": [c * 1e3 for c in cpu],
            "runs_path_ms": [p * 1e3 for p in path],
        }
    return out


def _ratio(values: list[float], base: list[float]) -> float:
    """The median over repeats of value / baseline of the same repeat."""
    return statistics.median(v / b for v, b in zip(values, base, strict=True))


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Hub aggregation, {result['nodes']} nodes × {result['size']:,} float32 parameters, "
        f"{result['repeats']} repeats, medians; ratio vs fedavg in the same repeat",
        caption=_verdict(result),
    )
    heads = (
        "aggregator",
        "accumulate ms",
        "finalize ms",
        "hub ms",
        "hub ×",
        "CPU ms",
        "CPU ×",
        "path ms",
        "path ×",
    )
    for head in heads:
        table.add_column(head, justify="left" if head == "aggregator" else "right")
    for label, m in result["aggregators"].items():
        table.add_row(
            label,
            f"{m['accumulate_ms']:.2f}",
            f"{m['finalize_ms']:.2f}",
            f"{m['hub_ms']:.2f}",
            f"{m['hub_ratio']:.2f}",
            f"{m['cpu_ms']:.2f}",
            f"{m['cpu_ratio']:.2f}",
            f"{m['path_ms']:.2f}",
            f"{m['path_ratio']:.2f}",
        )
    Console(width=140).print(table)


def _verdict(result: dict[str, Any]) -> str:
    robust = {k: v for k, v in result["aggregators"].items() if k != "fedavg"}
    worst = max(robust, key=lambda k: robust[k]["hub_ratio"])
    ratio = robust[worst]["hub_ratio"]
    met = [k for k, v in robust.items() if v["hub_ratio"] <= TARGET]
    cpu = [k for k, v in robust.items() if v["cpu_ratio"] <= TARGET]
    path = [k for k, v in robust.items() if v["path_ratio"] <= TARGET]
    return (
        f"target robust ≤ {TARGET}× fedavg, of {len(robust)}: aggregator alone met by {len(met)} "
        f"(slowest {worst} at {ratio:.2f}×), in CPU time by {len(cpu)}, with the protocol's "
        f"codec work by {len(path)}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--nodes", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer are noise)")
    if args.out is None:
        args.out = Path(__file__).resolve().parent / "results" / "robust_aggregation.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    measure(1_000, args.nodes, 5)  # warm-up, discarded: first calls pay for lazy setup
    start = time.perf_counter()
    aggregators = measure(args.size, args.nodes, args.repeats)
    result = {
        "benchmark": "robust_aggregation",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": info,
        "size": args.size,
        "nodes": args.nodes,
        "repeats": args.repeats,
        "target_ratio": TARGET,
        "wall_s": time.perf_counter() - start,
        "aggregators": aggregators,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    render(result)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
