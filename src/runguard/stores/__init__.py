"""Where shared budgets keep their totals: in this process, in SQLite, or in Redis.

A store knows nothing of guards, SDKs or prices. It keeps, for each key (a
budget's name and the start of its current window), what was spent and the
leases of calls admitted but not settled, and answers three atomic
operations. Every operation is one short transaction on the store's side.

Leases make stores crash-safe: a reservation names its expiry time; a
process that dies before settling leaves a lease that lapses, and the amount
it held returns to the budget at the next reservation on that key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

from .memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore
    from .sqlite import SQLiteStore

__all__ = ["Amounts", "Limits", "MemoryStore", "RedisStore", "SQLiteStore", "Store"]


def __getattr__(name: str) -> Any:
    # imported on first use: ``import runguard`` must not load sqlite3 or redis
    if name == "SQLiteStore":
        from .sqlite import SQLiteStore

        return SQLiteStore
    if name == "RedisStore":
        from .redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Amounts(NamedTuple):
    """Amounts of one call, or totals of a budget window."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: object) -> Amounts:
        if not isinstance(other, Amounts):
            return NotImplemented
        return Amounts(
            self.calls + other.calls,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
        )


class Limits(NamedTuple):
    """A budget's ceilings; None means no ceiling on that amount."""

    calls: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cost_usd: float | None = None

    def admits(self, total: Amounts) -> bool:
        """Whether ``total`` (spent + leased + asked) stays within every ceiling."""
        return (
            (self.calls is None or total.calls <= self.calls)
            and (self.input_tokens is None or total.input_tokens <= self.input_tokens)
            and (self.output_tokens is None or total.output_tokens <= self.output_tokens)
            and (self.total_tokens is None or total.total_tokens <= self.total_tokens)
            and (self.cost_usd is None or total.cost_usd <= self.cost_usd)
        )


@runtime_checkable
class Store(Protocol):
    """What a shared-budget store does. All three operations are atomic.

    ``now`` is the caller's clock (``time.time()``, seconds since the epoch,
    UTC); hosts sharing a store need synchronised clocks, as for any lease.
    ``expire_at`` is when the key's window ends: the store may forget the key
    some time after it.
    """

    #: shown in messages, e.g. "redis://127.0.0.1:6379/0" or "sqlite:/var/run/budgets.db"
    name: str

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
        """Drop lapsed leases of ``key``; if spent + leased + ``ask`` is within ``limits``,
        hold ``ask`` under ``lease_id`` until ``lease_until`` and return ``(True, totals)``,
        else ``(False, totals)``, where totals are spent + leased *before* this ask."""
        ...

    def settle(self, key: str, lease_id: str, actual: Amounts, expire_at: float) -> Amounts:
        """Drop the lease (if it has not lapsed) and add ``actual`` to what was spent;
        return the spent totals after."""
        ...

    def first(self, key: str, marker: str, expire_at: float) -> bool:
        """Record ``marker`` under ``key``; True only for the first caller (an alert fired once)."""
        ...
