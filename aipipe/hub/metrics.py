"""The hub's Prometheus metrics (`prometheus-client`) and its readiness check.

Two kinds of numbers, kept apart so that a second hub replica over the same store reports the
same counts:

- what lives in the store — nodes and rounds by state, updates accepted, ε each site stated in
  its plaintext headers, queue depths, model versions — is read from it at scrape time by
  `StoreCollector`;
- what one process observes — round stage durations, CDS request latency, refusals since it
  started — are instruments of `HubMetrics`, in a `CollectorRegistry` of its own (never the
  global default registry): `create_app` makes one per app and hands it down, so two apps in
  one process never share a counter.

Nothing here carries node-level detail beyond a node's name, nor a refusal's free-text reason
(it is sorted into `REFUSAL_CATEGORIES`), nor anything about a patient.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aipipe.audit.log import AuditLog
from aipipe.cds.models import HOOKS
from aipipe.clock import parse_instant
from aipipe.errors import RefusalCategory
from aipipe.store.hub_rounds import stated_epsilons
from aipipe.store.hub_store import HubStore
from aipipe.wire import RoundState

REFUSAL_CATEGORIES: tuple[RefusalCategory, ...] = get_args(RefusalCategory)
"""Every category of `aipipe_updates_refused_total` (`aipipe.errors.RefusalCategory`)."""

# Aggregating takes milliseconds to minutes (CKKS, a large model); collecting, seconds (a
# loopback test) to days (a consortium's deadline).
STAGE_BUCKETS_S = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
                   604800.0)  # fmt: skip
CDS_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# What `generate_latest` writes (names here need no escaping, so it is also valid 1.0.0 text);
# spelled out because newer clients' CONTENT_TYPE_LATEST says 1.0.0, older scrapers know 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HubMetrics:
    """One app's instruments and its registry; `watch(store)` adds the store's counts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.refused = Counter(
            "aipipe_updates_refused",
            "Updates and secure-round messages this hub process refused since it started, by "
            f"category ({', '.join(REFUSAL_CATEGORIES)}); the audit log has each refusal.",
            ["category"],
            registry=self.registry,
        )
        for category in REFUSAL_CATEGORIES:
            self.refused.labels(category)  # every category is exported, at 0 until it happens
        self.stage_seconds = Histogram(
            "aipipe_round_stage_duration_seconds",
            "How long rounds this hub process concluded spent in each stage: collecting (from "
            "opening until aggregation began) and aggregating (the sum and the new version).",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=self.registry,
        )
        self.cds_seconds = Histogram(
            "aipipe_cds_request_duration_seconds",
            "Latency of the hub's CDS Hooks requests, by route (discovery, call, feedback, "
            "model-card), hook (none for discovery) and outcome (ok, refused, unavailable, error).",
            ["route", "hook", "outcome"],
            buckets=CDS_BUCKETS_S,
            registry=self.registry,
        )
        self._store: StoreCollector | None = None

    def refusal(self, category: RefusalCategory) -> None:
        self.refused.labels(category).inc()

    def concluding(
        self, store: HubStore, study: str, number: int, now: datetime
    ) -> Callable[[], None]:
        """Observe the round's collecting stage as it ends (from its `opened_at` to `now`, when
        it was still taking updates: a round resumed in `aggregating` after a restart is not
        counted); the function returned observes its aggregating stage once the new version is
        published."""
        row = store.conn.execute(
            "SELECT state, opened_at FROM rounds WHERE study = ? AND round = ?", (study, number)
        ).fetchone()
        if row is not None and RoundState(row[0]).active:
            collecting = (now - parse_instant(row[1])).total_seconds()
            self.stage_seconds.labels("collecting").observe(max(0.0, collecting))
        started = time.perf_counter()
        return lambda: self.stage_seconds.labels("aggregating").observe(
            time.perf_counter() - started
        )

    def watch(self, store: HubStore) -> None:
        """Export `store`'s counts at every scrape (until `unwatch`)."""
        self.unwatch()
        self._store = StoreCollector(store)
        self.registry.register(self._store)

    def unwatch(self) -> None:
        if self._store is not None:
            self.registry.unregister(self._store)
            self._store = None

    def exposition(self) -> bytes:
        """Everything in Prometheus' text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class StoreCollector(Collector):
    """The counts that live in the hub's store, read at scrape time."""

    def __init__(self, store: HubStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        conn = self._store.conn
        yield _gauge(
            "aipipe_nodes", "Enrolled nodes by state.", ["state"],
            conn.execute("SELECT state, count(*) FROM nodes GROUP BY state"),
        )  # fmt: skip
        yield _gauge(
            "aipipe_rounds", "Rounds by state, every study.", ["state"],
            conn.execute("SELECT state, count(*) FROM rounds GROUP BY state"),
        )  # fmt: skip
        accepted = CounterMetricFamily(
            "aipipe_updates_accepted", "Updates the hub accepted into rounds, every study."
        )
        reported = conn.execute("SELECT count(*) FROM round_nodes WHERE status = 'reported'")
        accepted.add_metric([], float(reported.fetchone()[0]))
        yield accepted
        yield _gauge(
            "aipipe_epsilon_spent",
            "Cumulative ε each site stated for a study in its latest plaintext update header "
            "(the node's own privacy accounting). Secure studies (secagg, ckks) report none.",
            ["study", "site"],
            stated_epsilons(conn),
        )
        yield from self._queues(conn)
        yield _gauge(
            "aipipe_model_versions", "Model versions in the registry, by study.", ["study"],
            conn.execute("SELECT study, count(*) FROM models GROUP BY study"),
        )  # fmt: skip

    def _queues(self, conn: sqlite3.Connection) -> Iterable[Metric]:
        active = (RoundState.OPEN.value, RoundState.COLLECTING.value)
        yield _gauge(
            "aipipe_rounds_open", "Rounds taking updates (open or collecting), by study.",
            ["study"],
            conn.execute(
                "SELECT study, count(*) FROM rounds WHERE state IN (?, ?) GROUP BY study", active
            ),
        )  # fmt: skip
        yield _gauge(
            "aipipe_round_nodes_awaited",
            "Nodes selected for a round taking updates that have neither reported nor declined.",
            ["study", "round"],
            conn.execute(
                # from the few rounds taking updates to their nodes, never the other way
                "SELECT n.study, n.round, count(*) FROM rounds AS r CROSS JOIN round_nodes AS n "
                "ON r.study = n.study AND r.round = n.round WHERE r.state IN (?, ?) AND "
                "n.status = 'selected' GROUP BY n.study, n.round",
                active,
            ),
        )


def _gauge(
    name: str,
    documentation: str,
    labels: list[str],
    rows: Iterable[sqlite3.Row | tuple[object, ...]],
) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=labels)
    for row in rows:
        *values, value = tuple(row)
        gauge.add_metric([str(v) for v in values], float(value))
    return gauge


# -- readiness --------------------------------------------------------------------------------


def unready_reason(store: HubStore, audit: AuditLog) -> str | None:
    """Why the hub cannot serve now, or None: the store must answer a query and the audit log
    must be open with its file and folder writable (every decision the hub makes is audited).
    The reason names the part and the error's class, never a path or a value."""
    try:
        store.conn.execute("SELECT count(*) FROM meta").fetchone()
    except sqlite3.Error as exc:
        return f"the hub store does not answer a query ({type(exc).__name__})"
    try:
        audit.head()
    except (sqlite3.Error, OSError) as exc:
        return f"the audit log cannot be read ({type(exc).__name__})"
    path = audit.path
    if not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
        return "the audit log or its folder is not writable"
    return None


# -- CDS latency ------------------------------------------------------------------------------

CDS_PREFIX = "/cds-services"


class CdsLatency:
    """ASGI middleware timing the hub's CDS Hooks requests into `HubMetrics.cds_seconds`.

    Labels come from a fixed vocabulary: the route's kind, the hook the service id ends with
    (`<study>-<hook>`; `unknown` for any other id, so a caller cannot make new series), and
    the outcome of the status code."""

    def __init__(self, app: ASGIApp, metrics: HubMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(CDS_PREFIX):
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route, hook = _cds_route(path)
            elapsed = time.perf_counter() - started
            self.metrics.cds_seconds.labels(route, hook, _outcome(status)).observe(elapsed)


def _cds_route(path: str) -> tuple[str, str]:
    parts = path[len(CDS_PREFIX) :].strip("/").split("/")
    if parts == [""]:
        return "discovery", "none"
    hook = next((h for h in HOOKS if parts[0].endswith(f"-{h}")), "unknown")
    if len(parts) == 1:
        return "call", hook
    return ({"feedback": "feedback", "model-card": "model-card"}.get(parts[1], "other"), hook)


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 503:
        return "unavailable"
    return "refused" if status < 500 else "error"
