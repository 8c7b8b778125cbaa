"""Ceilings on calls, tokens and dollars (``max_calls``, ``max_*_tokens``, ``max_cost_usd``)."""

from __future__ import annotations

from collections.abc import Sequence
from math import inf
from typing import TYPE_CHECKING, Any

from .._errors import BudgetExceeded
from .._records import CallRequest, CallResult, Trip
from ..pricing import dollars

if TYPE_CHECKING:
    from .._ledger import Account

#: metric -> how its amounts read in a message
_NOUNS = {
    "calls": "calls",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
    "total_tokens": "tokens",
    "cost_usd": "cost",
}


def _amount(metric: str, value: float) -> str:
    if metric == "cost_usd":
        return dollars(value)
    return f"{int(value):,}"


class Ceiling:
    """Refuses the call that would take ``metric`` above ``limit``.

    Before a call, what was spent plus what calls in flight have reserved
    plus this call's worst case must stay within the limit. After a call, a
    run whose real usage went over (an input estimate that fell short, a
    request with no output cap) is latched so the next call is refused.
    """

    __slots__ = ("limit", "metric", "name", "needs_price")

    def __new__(cls, name: str, metric: str, limit: float) -> Ceiling:
        # One small subclass per metric keeps the hot check free of dispatch.
        if cls is Ceiling:
            if metric not in _KINDS:
                raise ValueError(f"unknown metric {metric!r}; one of {sorted(_KINDS)}")
            cls = _KINDS[metric]
        return object.__new__(cls)

    def __init__(self, name: str, metric: str, limit: float) -> None:
        self.name = name
        self.metric = metric
        self.limit = limit
        self.needs_price = metric == "cost_usd"

    # Each metric's subclass does the sums inline, since they run for every
    # call; these two only word the trip, which happens once.
    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        raise NotImplementedError

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        raise NotImplementedError

    def used(self, account: Account) -> float:
        """What the RunGuard has spent of this metric (settled calls)."""
        raise NotImplementedError

    def _refusal(self, request: CallRequest, spent: float, reserved: float, ask: float) -> Trip:
        metric = self.metric
        total = spent + reserved + ask
        in_flight = f", {_amount(metric, reserved)} reserved by calls in flight" if reserved else ""
        this_call = "" if metric == "calls" else f", this call up to {_amount(metric, ask)}"
        return Trip(
            guard=self.name,
            reason=(
                f"this {request.provider} call to {request.model} would bring {_NOUNS[metric]} "
                f"to {_amount(metric, total)}, over the limit of {_amount(metric, self.limit)} "
                f"({_amount(metric, spent)} spent{in_flight}{this_call})"
            ),
            limit=self.limit,
            observed=total,
            exception=BudgetExceeded,
        )

    def _overshoot(self, request: CallRequest, spent: float) -> Trip:
        metric = self.metric
        return Trip(
            guard=self.name,
            reason=(
                f"{_NOUNS[metric]} reached {_amount(metric, spent)} after this call to "
                f"{request.model} ({request.provider}), over the limit of "
                f"{_amount(metric, self.limit)}; further calls are refused"
            ),
            limit=self.limit,
            observed=spent,
            exception=BudgetExceeded,
        )

    def __repr__(self) -> str:
        return f"Ceiling({self.name!r}, {self.metric!r}, {self.limit!r})"


class _Calls(Ceiling):
    __slots__ = ()

    def used(self, account: Account) -> float:
        return account.calls

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        spent, reserved = account.calls, account.reserved_calls
        if spent + reserved + 1 <= self.limit:
            return None
        return self._refusal(request, spent, reserved, 1)

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        spent = account.calls
        return None if spent <= self.limit else self._overshoot(request, spent)


class _InputTokens(Ceiling):
    __slots__ = ()

    def used(self, account: Account) -> float:
        return account.input_tokens

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        spent, reserved, ask = (
            account.input_tokens,
            account.reserved_input_tokens,
            request.input_tokens,
        )
        if spent + reserved + ask <= self.limit:
            return None
        return self._refusal(request, spent, reserved, ask)

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        spent = account.input_tokens
        return None if spent <= self.limit else self._overshoot(request, spent)


class _OutputTokens(Ceiling):
    __slots__ = ()

    def used(self, account: Account) -> float:
        return account.output_tokens

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        spent, reserved = account.output_tokens, account.reserved_output_tokens
        ask = request.max_output_tokens
        if spent + reserved + ask <= self.limit:
            return None
        return self._refusal(request, spent, reserved, ask)

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        spent = account.output_tokens
        return None if spent <= self.limit else self._overshoot(request, spent)


class _TotalTokens(Ceiling):
    __slots__ = ()

    def used(self, account: Account) -> float:
        return account.input_tokens + account.output_tokens

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        spent = account.input_tokens + account.output_tokens
        reserved = account.reserved_input_tokens + account.reserved_output_tokens
        ask = request.input_tokens + request.max_output_tokens
        if spent + reserved + ask <= self.limit:
            return None
        return self._refusal(request, spent, reserved, ask)

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        spent = account.input_tokens + account.output_tokens
        return None if spent <= self.limit else self._overshoot(request, spent)


class _Cost(Ceiling):
    __slots__ = ()

    def used(self, account: Account) -> float:
        return account.cost_usd

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        spent, reserved = account.cost_usd, account.reserved_cost_usd
        ask = request.max_cost_usd or 0.0
        if spent + reserved + ask <= self.limit:
            return None
        return self._refusal(request, spent, reserved, ask)

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        spent = account.cost_usd
        return None if spent <= self.limit else self._overshoot(request, spent)


class Ceilings:
    """Consecutive ceilings of one RunGuard, checked in one pass.

    The keyword ceilings run on every call; summed and compared inline here,
    five of them cost one method call instead of five. Only when a sum fails
    are the members asked, in order, for the trip that words it.
    """

    __slots__ = ("calls", "cost_usd", "input_tokens", "members", "output_tokens", "total_tokens")

    def __init__(self, members: Sequence[Ceiling]) -> None:
        self.members = tuple(members)

        def limit(metric: str) -> float:
            return min((m.limit for m in self.members if m.metric == metric), default=inf)

        self.calls = limit("calls")
        self.input_tokens = limit("input_tokens")
        self.output_tokens = limit("output_tokens")
        self.total_tokens = limit("total_tokens")
        self.cost_usd = limit("cost_usd")

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        # each sum is the one its member's admit() compares, so the verdicts agree
        if (
            account.calls + account.reserved_calls + 1 <= self.calls
            and account.input_tokens + account.reserved_input_tokens + request.input_tokens
            <= self.input_tokens
            and account.output_tokens + account.reserved_output_tokens + request.max_output_tokens
            <= self.output_tokens
            and account.input_tokens
            + account.output_tokens
            + (account.reserved_input_tokens + account.reserved_output_tokens)
            + (request.input_tokens + request.max_output_tokens)
            <= self.total_tokens
            and account.cost_usd + account.reserved_cost_usd + (request.max_cost_usd or 0.0)
            <= self.cost_usd
        ):
            return None
        for member in self.members:
            trip = member.admit(request, account)
            if trip is not None:
                return trip
        return None

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        if (
            account.calls <= self.calls
            and account.input_tokens <= self.input_tokens
            and account.output_tokens <= self.output_tokens
            and account.input_tokens + account.output_tokens <= self.total_tokens
            and account.cost_usd <= self.cost_usd
        ):
            return None
        for member in self.members:
            trip = member.settled(request, result, account)
            if trip is not None:
                return trip
        return None


def checks(guards: Sequence[Any]) -> tuple[Any, ...]:
    """``guards`` as the ledger runs them: each run of two or more ceilings as one."""
    found: list[Any] = []
    run: list[Ceiling] = []
    for guard in (*guards, None):
        if isinstance(guard, Ceiling):
            run.append(guard)
            continue
        if len(run) > 1:
            found.append(Ceilings(run))
        else:
            found.extend(run)
        run = []
        if guard is not None:
            found.append(guard)
    return tuple(found)


_KINDS: dict[str, type[Ceiling]] = {
    "calls": _Calls,
    "input_tokens": _InputTokens,
    "output_tokens": _OutputTokens,
    "total_tokens": _TotalTokens,
    "cost_usd": _Cost,
}
