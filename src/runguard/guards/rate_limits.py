"""``max_consecutive_429s`` and ``max_total_429s``: stop retry storms per HTTP attempt.

The SDKs retry a 429 ("too many requests") on their own, twice by default,
inside one call; an agent loop then calls again. Counting calls would see a
fraction of what reached the provider, so this guard counts every attempt
and, when it trips, the SDK's pending retries are not sent.

It also stops at the first refusal that says a spending budget or quota is
exhausted (HTTP 402; a gateway's or provider's "budget exceeded" or
"insufficient quota" answer): no retry can succeed until that budget resets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import RateLimitStorm, UpstreamBudgetExceeded
from .._records import Attempt, CallRequest, CallResult, Trip
from ._inert import inert

if TYPE_CHECKING:
    from .._ledger import Account


class RateLimits:
    """Trips on the ``limit``-th 429 in a row (``consecutive``) or in all.

    A 429 is counted on every attempt the SDK sends, its own retries
    included; any other answer ends a streak. The attempt that reaches the
    limit is the last one sent.
    """

    __slots__ = ("consecutive", "limit", "name", "needs_price")

    def __init__(self, limit: int, consecutive: bool = True, name: str | None = None) -> None:
        self.consecutive = consecutive
        self.name = name or ("max_consecutive_429s" if consecutive else "max_total_429s")
        self.limit = limit
        self.needs_price = False

    @inert
    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        return None

    @inert
    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        return None

    def attempted(self, request: CallRequest, attempt: Attempt, account: Account) -> Trip | None:
        if attempt.budget_refusal is not None:
            return Trip(
                guard="upstream_budget",
                reason=(
                    f"the provider refused this call to {request.model} because a spending "
                    f"budget or quota is exhausted (status {attempt.status}: "
                    f"{attempt.budget_refusal!r}); retrying cannot succeed before it resets"
                ),
                limit=0,  # refusals of this kind tolerated
                observed=1,
                exception=UpstreamBudgetExceeded,
                details=_details(attempt, message=attempt.budget_refusal),
            )
        if attempt.status != 429:
            return None
        if self.consecutive:
            seen = account.consecutive_rate_limited
        else:
            seen = account.rate_limited_attempts
        if seen < self.limit:
            return None
        streak = " in a row" if self.consecutive else ""
        wait = (
            f"; the provider asked to wait {attempt.retry_after:g} s"
            if attempt.retry_after is not None
            else ""
        )
        return Trip(
            guard=self.name,
            reason=(
                f"{seen} attempts{streak} to call {request.model} were answered "
                f"'too many requests' (status 429), the limit is {self.limit}{wait}; "
                f"the SDK's pending retries and further calls are refused"
            ),
            limit=self.limit,
            observed=seen,
            exception=RateLimitStorm,
            details=_details(attempt),
        )

    def __repr__(self) -> str:
        kind = "consecutive" if self.consecutive else "total"
        return f"RateLimits({self.limit!r}, {kind})"


def _details(attempt: Attempt, **more: object) -> dict[str, object]:
    details: dict[str, object] = {"status": attempt.status}
    if attempt.retry_after is not None:
        details["retry_after"] = attempt.retry_after
    details.update(more)
    return details
