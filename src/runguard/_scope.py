"""Which RunGuards cover the code running now.

Context-scoped guards live in a ContextVar (the thread or asyncio task that
entered them, and the tasks it spawns); process-scoped guards live in the
ledger and cover every thread. Both tuples are kept innermost first.
"""

from __future__ import annotations

from contextvars import ContextVar

from ._ledger import LEDGER, Account

context_accounts: ContextVar[tuple[Account, ...]] = ContextVar("runguard_accounts", default=())


def active_accounts() -> tuple[Account, ...]:
    """Every RunGuard covering the caller, innermost first (empty outside any)."""
    local = context_accounts.get()
    shared = LEDGER.process
    if not shared:
        return local
    if not local:
        return shared
    # The later a guard was entered, the more inner it is.
    return tuple(sorted(local + shared, key=lambda a: a.serial, reverse=True))
