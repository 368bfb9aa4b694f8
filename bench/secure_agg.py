"""Benchmark: the cost of secure aggregation per round, in process, against a plain float32 sum.

    .venv/bin/python bench/secure_agg.py          # 1e3, 1e5, 1e6 × 4, 10, 50 nodes, 3 repeats
    .venv/bin/python bench/secure_agg.py --quick  # 1e3, 1e5 × 4, 10 nodes, 1 repeat

Everything runs in one process with no network, so the crypto is what is measured. Per round
and mode:

- `none`: each node turns its float update into float32 bytes; the hub folds them into a float64
  running sum.
- `secagg`: SecAgg+ (`aipipe.secure.secagg`) over 32-bit fixed point (clip 1, n_max = nodes).
  node = encode + `SecAggClient.mask` (decrypt the forwarded shares, PRG masks);
  hub = fold the masked inputs + `SecAggServer.finish` (Shamir reconstruction, mask removal)
  + decode. Key exchange (advertise, share_keys, unmask on the nodes; routing at the hub) is
  timed and counted apart, because it can run before training ends.
- `ckks`: TenSEAL CKKS with the parameters a study's key ceremony picks for that many nodes
  (`choose_ckks_params`, precision 1e-7: N = 4096, [60, 49], scale 2^37–2^41), symmetric.
  node = encrypt + serialize; hub = deserialize + add with the public context, plus one
  decryption of the sum by a key holder. Key exchange = generating the context once and sealing
  it to every other node (per study, not per round).

Columns: node ms is the mean over nodes of one node's work; hub ms is the hub's whole work for
the round; total = nodes × node + hub (the CPU the round costs). Bytes are what one node uploads
for its update (message payload: bytes and str fields, no wire framing). Ratios are against
`none` of the same size and node count, in the same repeat; repeats alternate the modes, and
the table gives medians. `--skip` lists size×nodes×mode cases left out (default: none).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aipipe.node.secure_rounds import CKKS_PRECISION
from aipipe.secure.ckks import (
    CkksContext,
    CkksSum,
    EncryptedVector,
    choose_ckks_params,
    open_context,
    seal_context,
)
from aipipe.secure.fixedpoint import FixedPointCodec
from aipipe.secure.identity import Identity
from aipipe.secure.sealedbox import x25519_public_bytes
from aipipe.secure.secagg import SecAggClient, SecAggConfig, SecAggServer

MODES = ("none", "secagg", "ckks")
CLIP = 1.0


@dataclasses.dataclass
class Run:
    node_s: list[float] = dataclasses.field(default_factory=list)
    hub_s: float = 0.0
    upload_bytes: int = 0
    keyx_s: float = 0.0
    keyx_bytes_per_node: float = 0.0
    max_abs_error: float = 0.0


def payload_bytes(message: Any) -> int:
    """Bytes and str fields of a message, recursively: a lower bound of its size on the wire."""
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, str):
        return len(message.encode())
    if isinstance(message, int):
        return 8
    if isinstance(message, tuple):
        return sum(payload_bytes(m) for m in message)
    if dataclasses.is_dataclass(message):
        return sum(payload_bytes(getattr(message, f.name)) for f in dataclasses.fields(message))
    raise TypeError(type(message))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_none(xs: dict[str, np.ndarray]) -> Run:
    run, total = Run(), np.zeros(next(iter(xs.values())).size)
    for x in xs.values():
        blob, seconds = timed(lambda x=x: x.astype(np.float32).tobytes())
        run.node_s.append(seconds)
        run.upload_bytes = len(blob)
        _, seconds = timed(
            lambda blob=blob: np.add(total, np.frombuffer(blob, np.float32), out=total)
        )
        run.hub_s += seconds
    run.max_abs_error = float(np.max(np.abs(total - sum(xs.values()))))
    return run


def run_secagg(xs: dict[str, np.ndarray], ids: dict[str, Identity], round_id: str) -> Run:
    run, n, d = Run(), len(xs), next(iter(xs.values())).size
    roster = {c: i.public_bytes for c, i in ids.items()}
    config = SecAggConfig.create(round_id=round_id, clients=list(xs), vector_length=d)
    codec = FixedPointCodec(clip=CLIP, n_max=n)
    server = SecAggServer(config=config, roster=roster)
    clients = {
        c: SecAggClient(config=config, client_id=c, identity=ids[c], roster=roster) for c in xs
    }
    keyx_bytes = 0

    def hub(fn: Callable[[], Any]) -> Any:
        out, seconds = timed(fn)
        run.keyx_s += seconds
        return out

    for client in clients.values():
        advert, seconds = timed(client.advertise)
        run.keyx_s += seconds
        keyx_bytes += payload_bytes(advert)
        hub(lambda a=advert: server.receive_advertisement(a))
    for c in hub(server.close_advertising):
        keys = hub(lambda c=c: server.neighbour_keys(c))
        reply, seconds = timed(lambda c=c, k=keys: clients[c].share_keys(k))
        run.keyx_s += seconds
        keyx_bytes += payload_bytes(reply)
        hub(lambda r=reply: server.receive_shares(r))
    for c in hub(server.close_sharing):
        fwd = hub(lambda c=c: server.forwarded_shares(c))
        masked, seconds = timed(lambda c=c, f=fwd: clients[c].mask(f, codec.encode(xs[c])))
        run.node_s.append(seconds)
        run.upload_bytes = payload_bytes(masked.data)
        _, seconds = timed(lambda m=masked: server.receive_masked_input(m))
        run.hub_s += seconds
    for c in hub(server.close_masking):
        request = hub(lambda c=c: server.unmask_request(c))
        reply, seconds = timed(lambda c=c, r=request: clients[c].unmask(r))
        run.keyx_s += seconds
        keyx_bytes += payload_bytes(reply)
        hub(lambda r=reply: server.receive_unmask(r))
    result, seconds = timed(lambda: codec.decode_sum(server.finish().total, n))
    run.hub_s += seconds
    run.keyx_bytes_per_node = keyx_bytes / n
    run.max_abs_error = float(np.max(np.abs(result - sum(xs.values()))))
    return run


def ckks_setup(ids: dict[str, Identity]) -> tuple[CkksContext, CkksContext, float, float]:
    """One node generates the context and seals it to every other node; the hub keeps the public."""
    owner = next(iter(ids))
    start = time.perf_counter()
    # The parameters a study's key ceremony picks (aipipe.node.secure_rounds.ckks_keygen).
    params = choose_ckks_params(
        max_abs_sum=len(ids) * CLIP, precision=CKKS_PRECISION, n_max=len(ids)
    )
    secret = CkksContext.generate(params)
    public = CkksContext.from_bytes(secret.public_bytes())
    sealed_bytes = 0
    for c in ids:
        if c == owner:
            continue
        node_key = X25519PrivateKey.generate()
        sealed = seal_context(
            secret,
            study_id="bench",
            recipient_id=c,
            recipient_public_key=x25519_public_bytes(node_key),
            sender=ids[owner],
        )
        sealed_bytes += payload_bytes(sealed)
        open_context(
            sealed,
            study_id="bench",
            recipient_id=c,
            recipient_key=node_key,
            sender_public_key=ids[owner].public_bytes,
        )
    seconds = time.perf_counter() - start
    return secret, public, seconds, sealed_bytes / len(ids)


def run_ckks(xs: dict[str, np.ndarray], secret: CkksContext, public: CkksContext) -> Run:
    run, total = Run(), CkksSum(public)
    for x in xs.values():
        blob, seconds = timed(lambda x=x: secret.encrypt(x).to_bytes())
        run.node_s.append(seconds)
        run.upload_bytes = len(blob)
        _, seconds = timed(lambda blob=blob: total.add(EncryptedVector.from_bytes(blob)))
        run.hub_s += seconds
    summed, seconds = timed(lambda: secret.decrypt(total.result()))
    run.hub_s += seconds
    run.max_abs_error = float(np.max(np.abs(summed - sum(xs.values()))))
    return run


def measure_case(size: int, nodes: int, repeats: int, skip: set[str]) -> dict[str, Any]:
    ids = {f"node{i:02d}": Identity.generate() for i in range(nodes)}
    modes = [m for m in MODES if f"{size}x{nodes}x{m}" not in skip]
    runs: dict[str, list[Run]] = {m: [] for m in modes}
    ckks_keyx: tuple[float, float] = (0.0, 0.0)
    ckks_params: dict[str, Any] = {}
    if "ckks" in modes:
        secret, public, keyx_s, keyx_bytes = ckks_setup(ids)
        ckks_keyx = (keyx_s, keyx_bytes)
        ckks_params = dataclasses.asdict(secret.params)
    for rep in range(repeats):
        rng = np.random.default_rng(rep)
        xs = {c: rng.uniform(-CLIP, CLIP, size) for c in ids}
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]  # rotate who goes first
        for mode in order:
            print(f"  {size:>9,} × {nodes:>2} {mode:<6} repeat {rep + 1}", file=sys.stderr)
            if mode == "none":
                runs[mode].append(run_none(xs))
            elif mode == "secagg":
                runs[mode].append(run_secagg(xs, ids, f"bench-{size}-{nodes}-{rep}"))
            else:
                run = run_ckks(xs, secret, public)
                run.keyx_s, run.keyx_bytes_per_node = ckks_keyx
                runs[mode].append(run)
    return {**summarise(size, nodes, runs), "ckks_params": ckks_params}


def summarise(size: int, nodes: int, runs: dict[str, list[Run]]) -> dict[str, Any]:
    out: dict[str, Any] = {"size": size, "nodes": nodes, "modes": {}}
    base = runs["none"]
    for mode, items in runs.items():
        node = [statistics.fmean(r.node_s) for r in items]
        hub = [r.hub_s for r in items]
        total = [nodes * a + b for a, b in zip(node, hub, strict=True)]
        base_node = [statistics.fmean(r.node_s) for r in base]
        base_total = [nodes * statistics.fmean(r.node_s) + r.hub_s for r in base]
        out["modes"][mode] = {
            "node_ms": _ms(node),
            "hub_ms": _ms(hub),
            "total_ms": _ms(total),
            "upload_bytes_per_node": items[0].upload_bytes,
            "node_ratio": statistics.median(a / b for a, b in zip(node, base_node, strict=True)),
            "hub_ratio": statistics.median(
                a / b for a, b in zip(hub, (r.hub_s for r in base), strict=True)
            ),
            "total_ratio": statistics.median(a / b for a, b in zip(total, base_total, strict=True)),
            "bytes_ratio": items[0].upload_bytes / base[0].upload_bytes,
            "keyx_ms": statistics.median(r.keyx_s for r in items) * 1e3,
            "keyx_bytes_per_node": items[0].keyx_bytes_per_node,
            "max_abs_error": max(r.max_abs_error for r in items),
            "runs_total_ms": [t * 1e3 for t in total],
        }
    return out


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Secure aggregation in process, {result['repeats']} repeat(s), medians; "
        "ratios vs `none` in the same repeat",
        caption=_targets(result),
    )
    heads = (
        "size",
        "nodes",
        "mode",
        "node ms",
        "hub ms",
        "total ms",
        "node ×",
        "hub ×",
        "total ×",
        "bytes/node",
        "bytes ×",
        "keyx ms",
        "keyx B/node",
        "max |err|",
    )
    for head in heads:
        table.add_column(head, justify="left" if head == "mode" else "right")
    for case in result["cases"]:
        for mode, m in case["modes"].items():
            table.add_row(
                f"{case['size']:,}",
                str(case["nodes"]),
                mode,
                f"{m['node_ms']:.3f}",
                f"{m['hub_ms']:.2f}",
                f"{m['total_ms']:.2f}",
                f"{m['node_ratio']:.1f}",
                f"{m['hub_ratio']:.1f}",
                f"{m['total_ratio']:.1f}",
                f"{m['upload_bytes_per_node']:,}",
                f"{m['bytes_ratio']:.2f}",
                f"{m['keyx_ms']:.1f}",
                f"{m['keyx_bytes_per_node']:,.0f}",
                f"{m['max_abs_error']:.1e}",
            )
    Console(width=200).print(table)
    if result["skipped"]:
        print("skipped: " + ", ".join(result["skipped"]))


def _targets(result: dict[str, Any]) -> str:
    lines = []
    for case in result["cases"]:
        if (case["size"], case["nodes"]) == (100_000, 10) and "secagg" in case["modes"]:
            m = case["modes"]["secagg"]
            lines.append(
                f"target secagg total ≤ 3× plain at 1e5 × 10: {m['total_ratio']:.1f}× "
                f"({'met' if m['total_ratio'] <= 3 else 'MISSED'}); bytes ≤ 1.1×: "
                f"{m['bytes_ratio']:.2f}× ({'met' if m['bytes_ratio'] <= 1.1 else 'MISSED'})"
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return common.machine(numpy=np.__version__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 10, 50])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", nargs="*", default=[], help="cases SIZExNODESxMODE to leave out")
    parser.add_argument("--quick", action="store_true", help="1e3, 1e5 × 4, 10 nodes, 1 repeat")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.nodes, args.repeats = [1_000, 100_000], [4, 10], 1
    if args.out is None:
        results = Path(__file__).resolve().parent / "results"
        quick = Path(tempfile.gettempdir()) / "secure_agg-quick.json"
        args.out = quick if args.quick else results / "secure_agg.json"
    return args


def warm_up() -> None:
    """One small round of every mode, discarded: first calls pay for imports and lazy setup."""
    measure_case(1_000, 4, 1, set())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    warm_up()
    start, skip = time.perf_counter(), set(args.skip)
    cases = [measure_case(s, n, args.repeats, skip) for s in args.sizes for n in args.nodes]
    result = {
        "benchmark": "secure_agg",
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": info,
        "repeats": args.repeats,
        "skipped": sorted(skip),
        "wall_s": time.perf_counter() - start,
        "cases": cases,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    render(result)
    print(f"wrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
