"""The default store: one process, in memory."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import Amounts, Limits


class MemoryStore:
    """Budget totals shared by every RunGuard of this process (not across processes).

    Windows that have ended are forgotten at the next operation after their
    ``expire_at``.
    """

    name = "memory"

    def __init__(self) -> None:
        # its own short lock: a store serves budgets across RunGuards and
        # threads, outside the ledger's lock (a shared store does I/O there)
        self._lock = threading.Lock()
        self._spent: dict[str, Amounts] = {}
        self._leases: dict[str, dict[str, tuple[Amounts, float]]] = {}
        self._markers: dict[str, set[str]] = {}
        self._expiry: dict[str, float] = {}

    def reserve(
        self,
        key: str,
        ask: Amounts,
        limits: Limits,
        lease_id: str,
        lease_until: float,
        now: float,
        expire_at: float,
    ) -> tuple[bool, Amounts]:
        from . import Amounts

        with self._lock:
            self._forget_ended(now)
            self._expiry[key] = expire_at
            leases = self._leases.setdefault(key, {})
            for lapsed in [i for i, (_, until) in leases.items() if until <= now]:
                del leases[lapsed]
            total = self._spent.get(key, Amounts())
            for held, _ in leases.values():
                total = total + held
            if not limits.admits(total + ask):
                return False, total
            leases[lease_id] = (ask, lease_until)
            return True, total

    def settle(self, key: str, lease_id: str, actual: Amounts, expire_at: float) -> Amounts:
        from . import Amounts

        with self._lock:
            self._expiry[key] = expire_at
            self._leases.get(key, {}).pop(lease_id, None)
            spent = self._spent[key] = self._spent.get(key, Amounts()) + actual
            return spent

    def first(self, key: str, marker: str, expire_at: float) -> bool:
        with self._lock:
            self._expiry[key] = expire_at
            seen = self._markers.setdefault(key, set())
            if marker in seen:
                return False
            seen.add(marker)
            return True

    def _forget_ended(self, now: float) -> None:
        ended = [key for key, until in self._expiry.items() if until < now]
        for key in ended:
            for table in (self._spent, self._leases, self._markers, self._expiry):
                table.pop(key, None)
