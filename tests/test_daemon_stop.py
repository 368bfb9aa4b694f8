"""SIGTERM stops the node daemon at once while it waits to retry an unreachable hub, inside a
work item too (not only in an idle long-poll)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aipipe.node.client import HubClient
from aipipe.node.daemon import Daemon


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _OneItemClient(HubClient):
    """A real client to a port nothing listens on, whose `work` offers one item."""

    def work(self, wait_s: float, **kwargs: Any) -> Any:
        return SimpleNamespace(kind="train", study="chd")


class _Worker:
    """Handles its one item with a hub call, as a real work item would (fetching its round)."""

    def __init__(self, client: HubClient) -> None:
        self.client = client
        self.waits: list[float] = []

    def resume_secure_rounds(self) -> list[str]:
        return []

    def declined_studies(self) -> set[str]:
        return set()

    def pending_personal(self) -> bool:
        return False

    def handle(self, item: Any) -> str:
        self.client.round("chd", 1)
        return "done"


def test_sigterm_ends_a_retry_wait_inside_a_work_item(tmp_path: Path) -> None:
    client = _OneItemClient(f"http://127.0.0.1:{_closed_port()}", max_retries=3, backoff_s=1.0)
    worker = _Worker(client)
    waits: list[float] = []
    daemon = Daemon(worker, lambda line: None)  # type: ignore[arg-type]
    sleep = daemon._sleep

    def counted(seconds: float) -> None:
        waits.append(seconds)
        sleep(seconds)

    daemon._sleep = counted  # type: ignore[method-assign]
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        done = daemon.run(once=False)
    finally:
        timer.cancel()
        client.close()

    assert daemon.stopping
    assert done == 1
    assert waits == [1.0]  # the first retry wait was cut short; no second one began
