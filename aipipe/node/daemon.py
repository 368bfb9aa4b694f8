"""The node daemon: long-poll the hub for work, do it, repeat; survive hub outages.

Nothing here holds state that a restart would lose: approvals, the budget ledger and the data
live in the node store, and the hub re-offers unfinished work, so a restarted node simply
continues. SIGTERM stops the daemon between work items, or at once while it waits: an idle
long-poll, or a wait to retry an unreachable hub, also inside a work item (what a work item
sends is written to the store before it leaves, so a restart re-sends the same bytes).

Personal models are made when the node is idle (`aipipe.node.personal_pending`): while one is
pending the daemon polls for at most `IDLE_GRACE_S` (the gap between a round's evaluation and
the next round's opening) and makes it only if the hub has no work; `once` makes the pending
ones before it stops. SIGTERM aborts the making at once; the version stays pending.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from aipipe.errors import ConflictError, HubUnavailableError, UpdateRejectedError
from aipipe.node.worker import NodeWorker

MAX_BACKOFF_S = 30.0
# How long a node with a personal model to make waits for more work first: long enough for the
# next round of back-to-back rounds to open, short against a personalization's wait otherwise.
IDLE_GRACE_S = 1.0


class _Stop(BaseException):
    """Raised by the SIGTERM handler to abort a wait. Not an `Exception`: a SecAgg+ round
    interrupted by it keeps its sealed state for the next start, as after a crash."""


class Daemon:
    def __init__(
        self,
        worker: NodeWorker,
        log: Callable[[str], None],
        poll_wait_s: float = 10.0,
        renew: Callable[[], str | None] | None = None,
    ):
        """`renew` (`aipipe.node.client_cert.Renewer.check`) runs before each long-poll and
        renews the TLS client certificate when it is due."""
        self.worker = worker
        self.renew = renew
        self.log = log
        self.poll_wait_s = poll_wait_s
        self.stopping = False
        self.done = 0
        self._idle = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self._idle:
            raise _Stop

    def run(self, *, once: bool) -> int:
        """Work until stopped (or, with `once`, until the hub has nothing for this node).

        Returns the number of work items done.
        """
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        client = self.worker.client
        sleep, client.sleep = client.sleep, self._sleep  # its retry waits end at SIGTERM too
        try:
            self._loop(once)
        except _Stop:
            pass
        finally:
            client.sleep = sleep
            signal.signal(signal.SIGTERM, previous)
        return self.done

    def _loop(self, once: bool) -> None:
        for line in self.worker.resume_secure_rounds():  # SecAgg+ rounds a restart interrupted
            self.log(line)
        backoff = 1.0
        declines = 0  # work declined in a row: a hub that re-offers it is not polled in a spin
        while not self.stopping:
            renewed = self.renew() if self.renew is not None else None
            if renewed is not None:
                self.log(renewed)
            try:
                self._idle = True
                skip = self.worker.declined_studies()
                pending = self.worker.pending_personal()
                item = self.worker.client.work(wait_s=self._wait(once, pending), skip=skip)
                self._idle = False
            except HubUnavailableError as exc:
                self._idle = False
                if once:
                    raise
                self.log(f"hub unavailable, retrying in {backoff:.0f}s: {exc}")
                self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            backoff = 1.0
            if item.kind == "idle":
                if pending:
                    self._personalize()
                if once:
                    break
                continue
            if item.study in skip:  # offered again although declined: an older hub
                if once:
                    break
                declines += 1
                self._sleep(min(2.0 ** (declines - 1), MAX_BACKOFF_S))
                continue
            declines = 0
            self.done += 1
            try:
                self.log(self.worker.handle(item))
            except (UpdateRejectedError, ConflictError) as exc:
                self.log(f"hub refused: {exc}")
            except HubUnavailableError as exc:
                if once:
                    raise
                self.log(f"hub went away mid-work; will retry: {exc}")

    def _wait(self, once: bool, pending: bool) -> float:
        if once:
            return 0
        return min(IDLE_GRACE_S, self.poll_wait_s) if pending else self.poll_wait_s

    def _personalize(self) -> None:
        """Make the pending personal models; SIGTERM aborts one while it trains."""
        for line in self.worker.make_personal(self._interruptible):
            self.log(line)

    @contextmanager
    def _interruptible(self) -> Iterator[None]:
        if self.stopping:
            raise _Stop
        self._idle = True
        try:
            yield
        finally:
            self._idle = False

    def _sleep(self, seconds: float) -> None:
        if self.stopping:  # SIGTERM came while a request was in flight: do not wait on
            raise _Stop
        self._idle = True
        try:
            time.sleep(seconds)
        finally:
            self._idle = False
