"""Verified API keys, remembered for a few seconds (HCNR_AUTH_CACHE_SECONDS).

Without it every request spent two PostgreSQL round trips (the key's row with its tenant,
then ending that transaction) and a worker-thread hop on authentication alone: under load
(bench/reliability.py `load`) that was a sixth of the API's time. A key that verified
(lookup found, not revoked, secret matched) is remembered under the SHA-256 of the whole
bearer token, never the token itself; a failure is never remembered, so a wrong or revoked
key always reaches the database. A key revoked after it was remembered keeps working for
at most `seconds` in each API process that remembered it (0 turns the cache off: every
request checks the database, as before).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from store.models import Tenant


class KeyCache:
    def __init__(
        self,
        seconds: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.seconds, self.max_entries, self.clock = seconds, max_entries, clock
        self._entries: OrderedDict[bytes, tuple[float, Tenant]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode()).digest()

    def get(self, token: str) -> Tenant | None:
        """The tenant of `token` if it verified less than `seconds` ago."""
        if self.seconds <= 0:
            return None
        digest = self._digest(token)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[0] <= self.clock():
                del self._entries[digest]
                return None
            return entry[1]

    def put(self, token: str, tenant: Tenant) -> None:
        """Remember a key that has just verified (its tenant detached from its session)."""
        if self.seconds <= 0:
            return
        digest = self._digest(token)
        with self._lock:
            self._entries[digest] = (self.clock() + self.seconds, tenant)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:  # the oldest first
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
