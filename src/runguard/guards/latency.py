"""``max_llm_seconds`` and ``max_wall_seconds``: time ceilings.

LLM seconds are measured with a monotonic clock around the SDK call only
(and around each read of a stream), so time the agent spends elsewhere,
in tools or in slow tracking writes, never counts. Wall seconds run from
the moment the RunGuard is entered.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from .._errors import LatencyBudgetExceeded
from .._records import CallRequest, CallResult, Trip

if TYPE_CHECKING:
    from .._ledger import Account


class LlmSeconds:
    """Refuses calls once the seconds spent inside LLM calls reach ``limit``.

    A call's time is known only when it ends, so a call in progress is never
    cut short; the call after the one that crossed the limit is refused.
    """

    __slots__ = ("limit", "name", "needs_price")

    def __init__(self, limit: float, name: str = "max_llm_seconds") -> None:
        self.name = name
        self.limit = limit
        self.needs_price = False

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        spent = account.llm_seconds
        if spent < self.limit:
            return None
        return self._trip(f"{spent:.2f} s spent in LLM calls already", spent)

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        spent = account.llm_seconds
        if spent <= self.limit:
            return None
        return self._trip(
            f"LLM calls took {spent:.2f} s in all after this call to {request.model}", spent
        )

    def _trip(self, what: str, spent: float) -> Trip:
        return Trip(
            guard=self.name,
            reason=f"{what}, over the limit of {self.limit:g} s; further calls are refused",
            limit=self.limit,
            observed=spent,
            exception=LatencyBudgetExceeded,
        )

    def __repr__(self) -> str:
        return f"LlmSeconds({self.limit!r})"


class WallSeconds:
    """Refuses calls once ``limit`` seconds have passed since the RunGuard was entered."""

    __slots__ = ("limit", "name", "needs_price")

    def __init__(self, limit: float, name: str = "max_wall_seconds") -> None:
        self.name = name
        self.limit = limit
        self.needs_price = False

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        elapsed = monotonic() - account.entered_at
        if elapsed < self.limit:
            return None
        return self._trip(elapsed, f"before a call to {request.model}")

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        elapsed = monotonic() - account.entered_at
        if elapsed < self.limit:
            return None
        return self._trip(elapsed, f"after a call to {request.model}")

    def _trip(self, elapsed: float, when: str) -> Trip:
        return Trip(
            guard=self.name,
            reason=(
                f"the guard has run for {elapsed:.2f} s ({when}), over the limit of "
                f"{self.limit:g} s; further calls are refused"
            ),
            limit=self.limit,
            observed=elapsed,
            exception=LatencyBudgetExceeded,
        )

    def __repr__(self) -> str:
        return f"WallSeconds({self.limit!r})"
