"""Benchmark: FHIR Bulk Data NDJSON → `NodeStore` ingest throughput and memory.

    .venv/bin/python bench/ingest.py              # 100k resources, 3 repeats
    .venv/bin/python bench/ingest.py --quick      # 10k smoke run
    .venv/bin/python bench/ingest.py --profile    # also cProfile one aipipe ingest

The input is generated from the Synthea R4 bundles: each resource gets its `urn:uuid:` id and
references rewritten to `Type/id` (as a FHIR server would store them), and the set is replicated
with fresh ids (`-r{k}` on every id and reference) up to N resources, one NDJSON file per type.

The floor is what any ingest must do, in plain `sqlite3`: read each line, `json.loads` it, key it
by (type, id) and insert it, 1000 rows per transaction, under the store's pragmas, into the
cheapest table that still enforces the key (a rowid table with UNIQUE (type, id)). A second floor
uses the store's own layout (WITHOUT ROWID, keyed by (type, id)), to show what that layout costs:
large rows in a WITHOUT ROWID B-tree, inserted in random key order, rewrite many pages per batch.
Floor and aipipe runs alternate in the same process; the report gives medians and their ratio.

Peak RSS is measured in fresh child processes (this script with `--child`), for N/10 and N
resources, so that import cost is the same in both and only ingest memory differs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import common

from aipipe.node.home import init_node, open_store
from aipipe.node.ingest import IngestReport, ingest_files

BUNDLES = Path("/work/shared/data/synthea_fhir_r4/bundles")
FLOOR_BATCH = 1000
_MARK = "@@REPLICA@@"  # stands for the `-r{k}` suffix in a resource's NDJSON template
_UUID = "urn:uuid:"
FLOORS = {
    "floor": """
        CREATE TABLE resources (
            type TEXT NOT NULL, id TEXT NOT NULL, json TEXT NOT NULL, UNIQUE (type, id)
        )
    """,
    "floor_without_rowid": """
        CREATE TABLE resources (
            type TEXT NOT NULL, id TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (type, id)
        ) WITHOUT ROWID
    """,
}
LABELS = {
    "floor": "floor (UNIQUE key)",
    "floor_without_rowid": "floor (WITHOUT ROWID)",
    "aipipe": "aipipe ingest_files",
}


# -- input ------------------------------------------------------------------------------------


def load_templates(bundles: Path) -> list[tuple[str, str]]:
    """(type, NDJSON line with `_MARK` after every id) for each distinct Synthea resource."""
    templates: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for path in sorted(bundles.glob("*.json")):
        with path.open(encoding="utf-8") as handle:
            entries = json.load(handle).get("entry", [])
        urls = {e["fullUrl"]: _type_and_id(e) for e in entries if "fullUrl" in e}
        for entry in entries:
            rtype, rid = _type_and_id(entry)
            if (rtype, rid) in seen:  # Organizations and Practitioners recur across bundles
                continue
            seen.add((rtype, rid))
            body = _with_references(entry["resource"], urls)
            body["id"] = rid + _MARK
            templates.append((rtype, json.dumps(body, separators=(",", ":"))))
    if not templates:
        raise SystemExit(f"no Synthea bundles (*.json) in {bundles}; pass --bundles DIR")
    return templates


def _type_and_id(entry: dict[str, Any]) -> tuple[str, str]:
    body = entry["resource"]
    url = entry.get("fullUrl", "")
    rid = url[len(_UUID) :] if url.startswith(_UUID) else body["id"]
    return body["resourceType"], rid


def _with_references(node: Any, urls: dict[str, tuple[str, str]]) -> Any:
    if isinstance(node, dict):
        out = {key: _with_references(value, urls) for key, value in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in urls:
            rtype, rid = urls[ref]
            out["reference"] = f"{rtype}/{rid}{_MARK}"
        return out
    if isinstance(node, list):
        return [_with_references(item, urls) for item in node]
    return node


def write_ndjson(templates: list[tuple[str, str]], n: int, directory: Path) -> dict[str, int]:
    """Write exactly `n` resources, replica after replica, one `<Type>.ndjson` per type."""
    directory.mkdir(parents=True)
    counts: Counter[str] = Counter()
    with ExitStack() as stack:
        handles: dict[str, IO[str]] = {}
        for index in range(n):
            replica, position = divmod(index, len(templates))
            rtype, template = templates[position]
            if rtype not in handles:
                path = directory / f"{rtype}.ndjson"
                handles[rtype] = stack.enter_context(path.open("w", encoding="utf-8"))
            handles[rtype].write(template.replace(_MARK, f"-r{replica}") + "\n")
            counts[rtype] += 1
    return dict(counts.most_common())


# -- the two contenders -----------------------------------------------------------------------


def run_floor(source: Path, db_path: Path, schema: str) -> tuple[float, int]:
    """Plain sqlite3: parse, key, insert. Returns (seconds, rows)."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(schema)
    rows = 0
    batch: list[tuple[str, str, str]] = []
    started = time.perf_counter()
    for path in sorted(source.glob("*.ndjson")):
        with path.open("rb") as handle:
            for line in handle:
                text = line.strip().decode("utf-8")
                parsed = json.loads(text)
                batch.append((parsed["resourceType"], parsed["id"], text))
                if len(batch) >= FLOOR_BATCH:
                    rows += _floor_flush(conn, batch)
    rows += _floor_flush(conn, batch)
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed, rows


def _floor_flush(conn: sqlite3.Connection, batch: list[tuple[str, str, str]]) -> int:
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO resources (type, id, json) VALUES (?, ?, ?)", batch)
    conn.execute("COMMIT")
    written = len(batch)
    batch.clear()
    return written


def run_aipipe(source: Path, home: Path) -> tuple[float, IngestReport]:
    """A fresh node home, then `ingest_files`. Only the ingest is timed."""
    store = open_store(init_node(home, "bench"))
    try:
        started = time.perf_counter()
        report = ingest_files(store, [source])
        elapsed = time.perf_counter() - started
    finally:
        store.close()
    return elapsed, report


def _check(report: IngestReport, n: int) -> None:
    stored, rejected = report.total("stored"), report.total("rejected")
    if stored != n or rejected:
        raise SystemExit(
            f"aipipe stored {stored} of {n} resources ({rejected} rejected: "
            f"{dict(report.reasons.most_common(3))}); the benchmark input or the mapping is wrong"
        )


# -- measurements -----------------------------------------------------------------------------


def throughput(source: Path, n: int, repeats: int, scratch: Path) -> dict[str, Any]:
    """Alternate floor and aipipe runs; per-run seconds, medians, ratio of medians."""
    runs: dict[str, list[float]] = {name: [] for name in LABELS}
    warnings: dict[str, int] = {}
    for repeat in range(repeats):
        work = scratch / f"run{repeat}"
        work.mkdir()
        for name, schema in FLOORS.items():
            seconds, rows = run_floor(source, work / f"{name}.sqlite", schema)
            if rows != n:
                raise SystemExit(f"{name} wrote {rows} rows, expected {n}")
            runs[name].append(seconds)
        seconds, report = run_aipipe(source, work / "home")
        _check(report, n)
        runs["aipipe"].append(seconds)
        warnings = dict(report.warnings.most_common())
        shutil.rmtree(work)
        done = ", ".join(f"{name} {values[-1]:.2f} s" for name, values in runs.items())
        print(f"  repeat {repeat + 1}/{repeats}: {done}", file=sys.stderr)
    rates = {name: [n / s for s in seconds] for name, seconds in runs.items()}
    medians = {name: statistics.median(values) for name, values in rates.items()}
    paired = [a / f for a, f in zip(rates["aipipe"], rates["floor"], strict=True)]
    return {
        "floor_schemas": {name: " ".join(schema.split()) for name, schema in FLOORS.items()},
        "seconds": runs,
        "resources_per_s": rates,
        "median_resources_per_s": medians,
        "ratio_of_medians": medians["aipipe"] / medians["floor"],
        "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired),
        "aipipe_warnings": warnings,
    }


def child_rss(source: Path, scratch: Path) -> dict[str, Any]:
    """Ingest `source` in a fresh interpreter (this script, `--child`); its RSS figures."""
    home = scratch / f"rss-{source.name}"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(source)]
    done = subprocess.run(
        [*command, "--child-home", str(home)], capture_output=True, text=True, check=False
    )
    shutil.rmtree(home, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"child ingest of {source} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child_main(source: Path, home: Path) -> None:
    """In the child: RSS after imports, then peak RSS after the ingest (KiB)."""
    baseline = _peak_rss_kib()
    seconds, report = run_aipipe(source, home)
    peak = _peak_rss_kib()
    _check(report, report.total("read"))
    figures = {
        "resources": report.total("read"),
        "stored": report.total("stored"),
        "seconds": seconds,
        "rss_after_import_kib": baseline,
        "peak_rss_kib": peak,
        "ingest_growth_kib": peak - baseline,
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    print(json.dumps(figures))


def _peak_rss_kib() -> int:
    """This process's peak RSS. Prefer VmHWM: Linux carries `ru_maxrss` across exec, so a
    child started by a big parent would report the parent's size; VmHWM starts afresh."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1])


def memory(small: Path, large: Path, scratch: Path) -> dict[str, Any]:
    low, high = child_rss(small, scratch), child_rss(large, scratch)
    return {
        "small": low,
        "large": high,
        "peak_ratio": high["peak_rss_kib"] / low["peak_rss_kib"],
        "growth_ratio": high["ingest_growth_kib"] / max(low["ingest_growth_kib"], 1),
    }


def profile_aipipe(source: Path, scratch: Path, top: int = 30) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    run_aipipe(source, scratch / "profile-home")
    profiler.disable()
    for key in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=sys.stdout).sort_stats(key).print_stats(top)


# -- report -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return common.machine(sqlite=sqlite3.sqlite_version)


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    speed, n, mb = result["throughput"], result["resources"], result["input_bytes"] / 1e6
    ratio, paired = speed["ratio_of_medians"], speed["median_paired_ratio"]
    table = Table(
        title=f"NDJSON → node store: {n:,} resources ({mb:.0f} MB), {result['repeats']} repeats",
        caption=f"aipipe/floor {ratio:.2f}× (median of per-repeat ratios {paired:.2f}×); "
        f"target ≥ 0.5: {'met' if ratio >= 0.5 else 'MISSED'}",
    )
    for column in ("", "median res/s", "MB/s", "runs (s)", "vs floor"):
        table.add_column(column, justify="left" if column in ("", "runs (s)") else "right")
    for name, label in LABELS.items():
        rate = speed["median_resources_per_s"][name]
        runs = ", ".join(f"{s:.2f}" for s in speed["seconds"][name])
        versus = rate / speed["median_resources_per_s"]["floor"]
        table.add_row(label, f"{rate:,.0f}", f"{rate * mb / n:.1f}", runs, f"{versus:.2f}×")
    console.print(table)

    rss = result["memory"]
    table = Table(title="aipipe peak RSS, fresh child process per size")
    for column in ("resources", "RSS after imports", "peak RSS", "ingest growth"):
        table.add_column(column, justify="right")
    for size in (rss["small"], rss["large"]):
        table.add_row(
            f"{size['resources']:,}",
            *(_mib(size[k]) for k in ("rss_after_import_kib", "peak_rss_kib", "ingest_growth_kib")),
        )
    peak = rss["peak_ratio"]
    table.caption = f"10× input → peak RSS {peak:.2f}×; target < 1.5×: " + (
        "met" if peak < 1.5 else "MISSED"
    )
    table.add_row("10× / 1×", "", f"{peak:.2f}×", f"{rss['growth_ratio']:.2f}×")
    console.print(table)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


# -- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resources", type=int, default=100_000, help="N (default 100000)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--quick", action="store_true", help="10k resources, 1 repeat smoke run")
    parser.add_argument("--profile", action="store_true", help="cProfile one aipipe ingest")
    parser.add_argument("--bundles", type=Path, default=BUNDLES, help="Synthea bundle folder")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-home", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.resources, args.repeats = 10_000, 1
    if args.out is None:
        name = "ingest-quick.json" if args.quick else "ingest.json"
        args.out = Path(__file__).resolve().parent / "results" / name
    if args.resources < 10 or args.repeats < 1:
        parser.error("--resources must be at least 10 and --repeats at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        child_main(args.child, args.child_home)
        return
    info = machine()
    n = args.resources
    with tempfile.TemporaryDirectory(prefix="aipipe-bench-") as tmp:
        scratch = Path(tmp)
        print(f"generating {n:,} resources from {args.bundles} …", file=sys.stderr)
        templates = load_templates(args.bundles)
        large = scratch / f"ndjson-{n}"
        types = write_ndjson(templates, n, large)
        write_ndjson(templates, n // 10, small := scratch / f"ndjson-{n // 10}")
        del templates
        input_bytes = sum(p.stat().st_size for p in large.iterdir())
        speed = throughput(large, n, args.repeats, scratch)
        print("measuring peak RSS in child processes …", file=sys.stderr)
        rss = memory(small, large, scratch)
        if args.profile:
            profile_aipipe(large, scratch)
    result = {
        "benchmark": "ingest",
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": info,
        "resources": n,
        "resources_by_type": types,
        "input_bytes": input_bytes,
        "repeats": args.repeats,
        "throughput": speed,
        "memory": rss,
    }
    render(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
