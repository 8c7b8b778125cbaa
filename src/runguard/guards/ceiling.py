"""Ceilings on calls, tokens and dollars (``max_calls``, ``max_*_tokens``, ``max_cost_usd``)."""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any

from .._errors import BudgetExceeded
from .._records import CallRequest, Trip, Usage

if TYPE_CHECKING:
    from .._ledger import Account


def _request_cost(request: CallRequest) -> float:
    return request.max_cost_usd or 0.0


# metric -> (what the call reserves, how the amount reads in a message)
_METRICS: dict[str, tuple[Callable[[CallRequest], float], str]] = {
    "calls": (lambda request: 1, "calls"),
    "input_tokens": (attrgetter("input_tokens"), "input tokens"),
    "output_tokens": (attrgetter("max_output_tokens"), "output tokens"),
    "total_tokens": (attrgetter("max_total_tokens"), "tokens"),
    "cost_usd": (_request_cost, "cost"),
}


def _amount(metric: str, value: float) -> str:
    if metric == "cost_usd":
        return f"${value:,.4f}"
    return f"{int(value):,}"


class Ceiling:
    """Refuses the call that would take ``metric`` above ``limit``.

    Before a call, what was spent plus what calls in flight have reserved
    plus this call's worst case must stay within the limit. After a call, a
    run whose real usage went over (an input estimate that fell short, a
    request with no output cap) is latched so the next call is refused.
    """

    __slots__ = ("_ask", "_reserved", "_spent", "limit", "metric", "name", "needs_price")

    def __init__(self, name: str, metric: str, limit: float) -> None:
        if metric not in _METRICS:
            raise ValueError(f"unknown metric {metric!r}; one of {sorted(_METRICS)}")
        self.name = name
        self.metric = metric
        self.limit = limit
        self.needs_price = metric == "cost_usd"
        self._spent: Callable[[Any], float] = attrgetter(metric)
        self._reserved: Callable[[Any], float] = attrgetter("reserved_" + metric)
        self._ask = _METRICS[metric][0]

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        spent = self._spent(account)
        reserved = self._reserved(account)
        ask = self._ask(request)
        total = spent + reserved + ask
        if total <= self.limit:
            return None
        m, noun = self.metric, _METRICS[self.metric][1]
        in_flight = f", {_amount(m, reserved)} reserved by calls in flight" if reserved else ""
        return Trip(
            guard=self.name,
            reason=(
                f"this {request.provider} call to {request.model} would bring {noun} to "
                f"{_amount(m, total)}, over the limit of {_amount(m, self.limit)} "
                f"({_amount(m, spent)} spent{in_flight}, this call up to {_amount(m, ask)})"
            ),
            limit=self.limit,
            observed=total,
            exception=BudgetExceeded,
        )

    def settled(self, request: CallRequest, usage: Usage, account: Account) -> Trip | None:
        spent = self._spent(account)
        if spent <= self.limit:
            return None
        m, noun = self.metric, _METRICS[self.metric][1]
        return Trip(
            guard=self.name,
            reason=(
                f"{noun} reached {_amount(m, spent)} after a {request.provider} call to "
                f"{request.model}, over the limit of {_amount(m, self.limit)}; "
                f"further calls are refused"
            ),
            limit=self.limit,
            observed=spent,
            exception=BudgetExceeded,
        )

    def __repr__(self) -> str:
        return f"Ceiling({self.name!r}, {self.metric!r}, {self.limit!r})"
