"""Benchmark: CDS Hooks patient-view latency and throughput over real HTTP on loopback.

    .venv/bin/python bench/cds_latency.py            # 2000 requests per level, 3 rounds
    .venv/bin/python bench/cds_latency.py --quick    # 300 requests per level, 1 round, no JSON
    .venv/bin/python bench/cds_latency.py --tls      # and the same service over HTTPS

A uvicorn server (one worker, in a child process: the load generator must not share its GIL)
serves `cds_router` with a logistic model trained on Cleveland's heart data (`train_local`, no
DP), auditing every call to a real `AuditLog` ("cds"); the same router without an audit log
("cds-no-audit", to show the audit's share); and a floor: a bare FastAPI endpoint that reads the
same request body and returns a constant card of the same size. The client (httpx
AsyncClient) posts patient-view requests with full prefetch for Cleveland's patients at
concurrency 1, 16 and 64, the contenders alternating within each round; it reports p50, p95,
p99 latency, requests/s, each throughput as a share of the floor's, and the CPU time per request
of the server (all its threads, from /proc) and of the client: shares of a loaded machine's CPU
move with its load, CPU per request much less. With `--tls` a second server child serves the
same app over HTTPS (`aipipe.tls.ServerTls`, a throwaway P-256 CA and certificate; the client
verifies it, TLS 1.3 negotiated) and "cds-tls" runs alternating with the plain contenders, so
its figures are against plain HTTP in the same run. Each simulated client keeps its connection
(as an EHR's CDS client does), so the handshake is paid once per client, not per request.
Targets: p99 < 50 ms at 64 concurrent clients; throughput ≥ 50% of the floor.

Also timed, in process: JWT verification (ES384, RS384) per call, which this run leaves off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import common
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

ROOT = Path(__file__).resolve().parents[1]
CLEVELAND = ROOT / "examples" / "heart-disease" / "fhir" / "cleveland"
STUDY = ROOT / "examples" / "heart-disease" / "study.yaml"
SERVICE = "fed-heart-disease-patient-view"
VERSION = "b3c4" * 16
KEY = b"bench-cds-pseudonym-key-32-bytes"
LEVELS = (1, 16, 64)
CONTENDERS = ("floor", "cds", "cds-no-audit")
TLS_CONTENDER = "cds-tls"


# -- the server (child process) ---------------------------------------------------------------


def train_scorer(workdir: Path) -> Any:
    """Cleveland's logistic model, trained without DP (as the CDS tests do)."""
    import torch

    from aipipe.cds import PatientScorer
    from aipipe.models import build_model
    from aipipe.models.training import train_local
    from aipipe.node.ingest import ingest_files
    from aipipe.store.node_store import NodeStore
    from aipipe.study.blocks import Privacy, Training
    from aipipe.study.features import extract
    from aipipe.study.spec import load_study

    torch.set_num_threads(1)
    study = load_study(STUDY)
    store = NodeStore.open(workdir / "store.sqlite", KEY)
    ingest_files(store, [CLEVELAND])
    matrix = extract(store, study)
    store.close()
    model = build_model(study.model, len(matrix.columns), seed=0)
    training = Training(local_steps=200, batch_size=32, lr=0.05)
    trained = train_local(
        model,
        matrix.x_train,
        matrix.y_train,
        training=training,
        privacy=Privacy(mode="none"),
        noise_multiplier=None,
        seed=1,
    )
    return PatientScorer(study, trained.weights, matrix.preprocessor, VERSION)


def build_app(audit_path: Path) -> FastAPI:
    from aipipe.audit import AuditLog
    from aipipe.cds import CdsSettings, StaticCdsProvider, build_cards, cds_router

    scorer = train_scorer(audit_path.parent)
    settings = CdsSettings(outcome_label="Coronary artery disease")
    provider = StaticCdsProvider([scorer], settings={scorer.study.name: settings})
    audit = AuditLog.open(audit_path, None, owner="hub/bench")
    app = FastAPI()
    # Served on 127.0.0.1 only, so the loopback opt-out from client JWTs applies (JWT checks
    # are timed on their own below).
    app.include_router(
        cds_router(provider, audit=audit, jwt=None, pseudonym_key=KEY, allow_unauthenticated=True)
    )
    # The same service without its audit log, to show what one fsync'd event per call costs.
    quiet = cds_router(
        provider, audit=None, jwt=None, pseudonym_key=KEY, allow_unauthenticated=True
    )
    app.include_router(quiet, prefix="/no-audit")

    # The floor's constant answer: a real card for a real patient, so the bytes match.
    prefetch = prefetch_bodies(1)[0]["prefetch"]
    resources = [prefetch["patient"], *(e["resource"] for e in prefetch["observations"]["entry"])]
    source = provider.services()[0].source()
    now = datetime.now(UTC)
    cards = build_cards(scorer.score(resources), source=source, settings=settings, now=now)
    constant = json.dumps({"cards": [card.dump() for card in cards]}).encode()

    @app.post("/floor")
    async def floor(request: Request) -> Response:
        await request.body()
        return Response(constant, media_type="application/json")

    return app


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway P-256 CA and a server certificate it signs for 127.0.0.1: (ca, cert, key)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("bench CA", ca_key, "bench CA", ca_key, True)
    cert = certificate("127.0.0.1", key, "bench CA", ca_key, False)
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def serve(port_file: Path, audit_path: Path, tls_dir: Path | None) -> None:
    import uvicorn

    from aipipe.tls import ServerTls

    tls: dict[str, Any] = {}
    if tls_dir is not None:
        cert = ServerTls(tls_dir / "server.pem", tls_dir / "server.key", "bench")
        tls = cert.uvicorn_options()
    app = build_app(audit_path)
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP (proto 0 does not), and without it Nagle holds each response's
    # body behind its headers until the client's delayed ACK: +40 ms a request (cf. uvicorn#3149).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port_file.write_text(str(sock.getsockname()[1]))
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=60, **tls
    )
    uvicorn.Server(config).run(sockets=[sock])


# -- requests ---------------------------------------------------------------------------------


def prefetch_bodies(limit: int | None = None) -> list[dict[str, Any]]:
    """A patient-view request with full prefetch for each Cleveland patient."""
    records: dict[str, dict[str, Any]] = {}
    for line in (CLEVELAND / "Patient.ndjson").read_text().splitlines():
        patient = json.loads(line)
        records[patient["id"]] = {"patient": patient, "observations": [], "conditions": []}
    for name, key in (("Observation", "observations"), ("Condition", "conditions")):
        for line in (CLEVELAND / f"{name}.ndjson").read_text().splitlines():
            resource = json.loads(line)
            records[resource["subject"]["reference"].removeprefix("Patient/")][key].append(resource)
    bodies = []
    for pid, record in list(records.items())[:limit]:
        prefetch = {"patient": record["patient"]}
        for key in ("observations", "conditions"):
            entries = [{"resource": r} for r in record[key]]
            prefetch[key] = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
        bodies.append(
            {
                "hook": "patient-view",
                "hookInstance": str(uuid.uuid4()),
                "context": {"userId": "Practitioner/bench", "patientId": pid},
                "prefetch": prefetch,
            }
        )
    return bodies


async def load(
    base: str,
    path: str,
    bodies: list[bytes],
    total: int,
    concurrency: int,
    verify: ssl.SSLContext | bool = True,
) -> dict[str, Any]:
    """`total` POSTs from `concurrency` clients, each sending its next request when the last
    is answered (a closed loop). One AsyncClient per simulated client: a single pooled client
    scans its pool on every request, which at 64 connections costs more than the server does."""
    latencies: list[float] = []
    failures = 0
    next_index = 0
    headers = {"content-type": "application/json"}

    async def worker() -> None:
        nonlocal next_index, failures
        async with httpx.AsyncClient(base_url=base, timeout=60.0, verify=verify) as client:
            while next_index < total:
                body = bodies[next_index % len(bodies)]
                next_index += 1
                started = time.perf_counter()
                try:
                    response = await client.post(path, content=body, headers=headers)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                failures += not ok

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": total,
        "failures": failures,
        "wall_s": wall,
        "rps": total / wall,
        "p50_ms": _quantile(latencies, 0.50) * 1e3,
        "p95_ms": _quantile(latencies, 0.95) * 1e3,
        "p99_ms": _quantile(latencies, 0.99) * 1e3,
    }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- JWT verification, in process -------------------------------------------------------------


def jwt_costs(calls: int = 300) -> dict[str, float]:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from aipipe.cds import JwtPolicy

    out: dict[str, float] = {}
    for alg in ("ES384", "RS384"):
        if alg == "ES384":
            key: Any = ec.generate_private_key(ec.SECP384R1())
            public = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            public = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        public["kid"] = "k"
        policy = JwtPolicy({"https://ehr": {"keys": [public]}}, base_url="https://cds")
        now = int(time.time())
        claims = {"iss": "https://ehr", "aud": "https://cds/x", "iat": now, "exp": now + 60}
        headers = {"kid": "k", "typ": "JWT"}
        tokens = [
            jwt.encode(claims | {"jti": str(uuid.uuid4())}, key, algorithm=alg, headers=headers)
            for _ in range(calls)
        ]
        started = time.perf_counter()
        for token in tokens:
            policy.verify(f"Bearer {token}", "https://cds/x")
        out[f"{alg}_verify_us"] = (time.perf_counter() - started) / calls * 1e6
    return out


# -- driver -----------------------------------------------------------------------------------


def start_server(
    workdir: Path, verify: ssl.SSLContext | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """The server child; over HTTPS with the certificate in `workdir` when `verify` is given."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    command = [sys.executable, __file__, "--serve", str(port_file)]
    command += ["--audit", str(workdir / "audit.sqlite")]
    if verify is not None:
        command += ["--tls-dir", str(workdir)]
    child = subprocess.Popen(command, cwd=ROOT)
    scheme = "http" if verify is None else "https"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"the server exited with {child.returncode}")
        if port_file.exists() and port_file.read_text():
            base = f"{scheme}://127.0.0.1:{port_file.read_text()}"
            try:
                answer = httpx.get(base + "/cds-services", timeout=2, verify=verify or True)
                if answer.status_code == 200:
                    return child, base
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    child.kill()
    raise SystemExit("the server did not become ready in 180 s")


def run(args: argparse.Namespace) -> dict[str, Any]:
    bodies = [json.dumps(b).encode() for b in prefetch_bodies()]
    contenders = contenders_of(args)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {} for name in contenders}
    paths = {
        "floor": "/floor",
        "cds": f"/cds-services/{SERVICE}",
        "cds-no-audit": f"/no-audit/cds-services/{SERVICE}",
        TLS_CONTENDER: f"/cds-services/{SERVICE}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        verify: dict[str, ssl.SSLContext | bool] = dict.fromkeys(contenders, True)
        servers = {"http": start_server(Path(tmp) / "http")}
        if args.tls:
            (Path(tmp) / "https").mkdir()
            ca, _, _ = make_certificate(Path(tmp) / "https")
            trusting = ssl.create_default_context(cafile=str(ca))
            verify[TLS_CONTENDER] = trusting
            servers["https"] = start_server(Path(tmp) / "https", trusting)
            args.tls_version = negotiated(servers["https"][1], trusting)
        where = {n: servers["https" if n == TLS_CONTENDER else "http"] for n in contenders}
        try:
            for name in contenders:  # warm-up: imports, first scorer store, connections
                base = where[name][1]
                asyncio.run(load(base, paths[name], bodies, 200, 16, verify[name]))
            for _ in range(args.rounds):
                for level in LEVELS:
                    for name in contenders:
                        child, base = where[name]
                        server, client = _cpu_seconds(child.pid), time.process_time()
                        figures = asyncio.run(
                            load(base, paths[name], bodies, args.requests, level, verify[name])
                        )
                        figures["server_cpu_ms"] = (
                            (_cpu_seconds(child.pid) - server) / args.requests * 1e3
                        )
                        figures["client_cpu_ms"] = (
                            (time.process_time() - client) / args.requests * 1e3
                        )
                        runs[name].setdefault(level, []).append(figures)
        finally:
            for child, _ in servers.values():
                child.terminate()
                child.wait(timeout=30)
    return runs


def negotiated(base: str, context: ssl.SSLContext) -> str:
    """The TLS version the client and the HTTPS server agree on."""
    port = int(base.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return str(tls.version())


def contenders_of(args: argparse.Namespace) -> tuple[str, ...]:
    return (*CONTENDERS, TLS_CONTENDER) if args.tls else CONTENDERS


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(runs: dict[str, dict[int, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    rows = []
    for level in LEVELS:
        medians = {
            name: {
                key: statistics.median(r[key] for r in runs[name][level])
                for key in ("rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms", "client_cpu_ms")
            }
            for name in runs
        }
        failures = {name: sum(r["failures"] for r in runs[name][level]) for name in runs}
        for name in runs:
            share = medians[name]["rps"] / medians["floor"]["rps"]
            row = {"contender": name, "concurrency": level, **medians[name]}
            if name == TLS_CONTENDER:  # against plain HTTP in the same run
                row["p50_over_plain"] = medians[name]["p50_ms"] / medians["cds"]["p50_ms"]
                row["rps_over_plain"] = medians[name]["rps"] / medians["cds"]["rps"]
            rows.append(row | {"failures": failures[name], "share_of_floor": share})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'contender':<12} {'conc':>4} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'of floor':>9} {'srv cpu ms':>10} {'cli cpu ms':>10} {'fail':>5}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row['contender']:<12} {row['concurrency']:>4} {row['rps']:>8.0f} "
            f"{row['p50_ms']:>8.2f} "
            f"{row['p95_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['share_of_floor']:>9.0%} "
            f"{row['server_cpu_ms']:>10.2f} {row['client_cpu_ms']:>10.2f} {row['failures']:>5}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per level and run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all levels")
    parser.add_argument("--quick", action="store_true", help="300 requests, 1 round")
    parser.add_argument("--tls", action="store_true", help="add the service over HTTPS")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--audit", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = 300, 1
    args.tls_version = None
    if args.out is None and not args.quick:  # a smoke run writes nothing unless asked to
        name = "cds_latency-tls.json" if args.tls else "cds_latency.json"
        args.out = ROOT / "bench" / "results" / name
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.audit, args.tls_dir)
        return
    runs = run(args)
    rows = summarise(runs)
    print_table(rows)
    at64 = {row["contender"]: row for row in rows if row["concurrency"] == 64}
    targets = {
        "p99_ms_at_64_below_50": at64["cds"]["p99_ms"] < 50.0,
        "throughput_at_least_half_of_floor": all(
            row["share_of_floor"] >= 0.5 for row in rows if row["contender"] == "cds"
        ),
    }
    # Little's law: 64 clients in a closed loop wait 64 / throughput on average, so no server
    # slower than 64 / 0.05 s = 1280 req/s can keep p99 under 50 ms there, the floor included.
    bound_ms = 64 / at64["floor"]["rps"] * 1e3
    print(f"\nLittle's law at 64 clients: the floor's own mean latency is {bound_ms:.0f} ms")
    costs = jwt_costs()
    print(
        f"JWT verify per call (in process): ES384 {costs['ES384_verify_us']:.0f} µs, "
        f"RS384 {costs['RS384_verify_us']:.0f} µs"
    )
    print("targets:", ", ".join(f"{k}={'met' if v else 'MISSED'}" for k, v in targets.items()))
    if args.tls:
        print(f"HTTPS: {args.tls_version} ({ssl.OPENSSL_VERSION}), one connection per client")
    for row in rows:
        if row["contender"] == TLS_CONTENDER:
            print(
                f"HTTPS ÷ plain HTTP at {row['concurrency']:>2} clients: p50 "
                f"{row['p50_over_plain']:.2f}×, throughput {row['rps_over_plain']:.2f}×"
            )
    result = {
        "benchmark": "cds_latency",
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "machine": common.machine(),
        "requests_per_level": args.requests,
        "rounds": args.rounds,
        "rows": rows,
        "targets": targets,
        "floor_mean_latency_ms_at_64": bound_ms,
        "jwt": costs,
        "tls": {"negotiated": args.tls_version, "openssl": ssl.OPENSSL_VERSION}
        if args.tls
        else None,
        "runs": {name: {str(k): v for k, v in levels.items()} for name, levels in runs.items()},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
