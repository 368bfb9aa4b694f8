"""The login route's guard against a guessing caller (`POST /v1/auth/token`).

The login is the one hub route an unauthenticated caller can make expensive: each attempt costs
a scrypt run (about 32 MiB and tens of milliseconds). The person lock (`people.LOCK_AFTER`)
stops guessing one person's password; it does not stop one caller trying a common password
against every name. So, per client address:

- at most `LIMIT` logins that failed, or are still being checked, within a sliding `WINDOW`;
  past that a login is refused with 429 (`ThrottledError`, with `Retry-After`) before its
  password is checked, even a right one. Callers from other addresses are not affected, so a
  sprayer cannot lock people out from their own desks;
- the refusals are audited ``auth.throttled``: the first at once, then at most one event per
  `AUDIT_EVERY` with how many were refused since, so a flood cannot grow the audit log.

`People.login` also runs the scrypt check in a worker thread, at most `CONCURRENT` at once, so
logins never stall the event loop that serves rounds, and a burst cannot take the hub's memory.

The state is the hub process's memory, for at most `MAX_ADDRESSES` addresses (the least recently
seen are forgotten first); a restart forgets it. The address is the TCP peer's: behind a reverse
proxy every caller would share the proxy's, which is one more reason the hub terminates its own
TLS (docs/deployment.md).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

LIMIT = 10
WINDOW = timedelta(minutes=15)
AUDIT_EVERY = timedelta(minutes=1)
CONCURRENT = 2
MAX_ADDRESSES = 10_000


@dataclass
class _Address:
    failures: deque[datetime] = field(default_factory=deque)
    in_flight: int = 0
    refused: int = 0  # throttled since the last audited refusal
    audited_at: datetime | None = None


@dataclass(frozen=True)
class Throttle:
    """A refusal: how long until the address may try again, and what to audit (None: nothing
    this time, the count goes into a later event)."""

    retry_after_s: int
    audit: dict[str, int] | None


class LoginGuard:
    """Per-address counts of failed and in-flight logins (see module)."""

    def __init__(self, limit: int = LIMIT, window: timedelta = WINDOW) -> None:
        self.limit = limit
        self.window = window
        self._seen: OrderedDict[str, _Address] = OrderedDict()

    def admit(self, address: str, now: datetime) -> Throttle | None:
        """None, and the attempt counts as in flight until `done`; or the refusal."""
        state = self._state(address, now)
        if len(state.failures) + state.in_flight < self.limit:
            state.in_flight += 1
            return None
        state.refused += 1
        oldest = state.failures[0] if state.failures else now
        wait = max(1, math.ceil((oldest + self.window - now).total_seconds()))
        if state.audited_at is not None and now - state.audited_at < AUDIT_EVERY:
            return Throttle(wait, None)
        audit = {"failures": len(state.failures), "refused": state.refused}
        state.audited_at, state.refused = now, 0
        return Throttle(wait, audit)

    def done(self, address: str, now: datetime, *, failed: bool) -> None:
        """The admitted attempt ended; a failure stays counted for `window`."""
        state = self._state(address, now)
        state.in_flight = max(0, state.in_flight - 1)
        if failed:
            state.failures.append(now)

    def _state(self, address: str, now: datetime) -> _Address:
        state = self._seen.pop(address, None) or _Address()
        while state.failures and now - state.failures[0] >= self.window:
            state.failures.popleft()
        self._seen[address] = state  # most recently seen last
        while len(self._seen) > MAX_ADDRESSES:
            self._seen.popitem(last=False)
        return state
