"""Budgets that outlive a run: per minute, hour, day, week or month, shared through a store.

A RunGuard's ceilings end with the RunGuard. A :class:`Budget` is a named
allowance for a calendar window in UTC ("$150 a day for the support team"),
kept in a :mod:`store <runguard.stores>` so that every RunGuard, thread and
process using it draws on the same totals. Before a call is sent, each
budget covering it reserves the call's worst case under a lease; after the
call, the lease is replaced by what the call really used.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

from ._checks import positive
from ._errors import BudgetExceeded, BudgetUnavailable
from ._records import CallRequest, Trip, Usage
from .alerts import Alert, OnAlert, check_on_alert, check_thresholds
from .pricing import dollars
from .stores import Amounts, Limits, MemoryStore, Store

if TYPE_CHECKING:
    from ._ledger import Account

Period = Literal["minute", "hour", "day", "week", "month"]
Action = Literal["reject", "alert"]
OnStoreError = Literal["reject", "allow"]

#: seconds a reservation holds its amount if its process never settles it
DEFAULT_LEASE_SECONDS = 600.0
#: the store budgets use when none is given: this process only
DEFAULT_STORE = MemoryStore()

_METRICS = ("calls", "input_tokens", "output_tokens", "total_tokens", "cost_usd")


class Budget:
    """A named allowance for a calendar window, shared by every RunGuard that lists it.

    Args:
        name: identifies the budget in its store: RunGuards (and processes)
            naming the same budget on the same store share its totals.
        max_calls: calls per window. This and the four ceilings below are
            each optional, but at least one must be given.
        max_input_tokens: input tokens per window.
        max_output_tokens: output tokens per window.
        max_total_tokens: input plus output tokens per window.
        max_cost_usd: dollars per window.
        period: ``"minute"``, ``"hour"``, ``"day"`` (default), ``"week"``
            (from Monday) or ``"month"``; windows are calendar-aligned in UTC.
        store: where the totals live (default: this process's memory).
        action: ``"reject"`` (default) refuses the call that would cross a
            ceiling; ``"alert"`` only reports, once per window, when a
            ceiling is reached.
        alert_at: fractions of the ceilings to warn at (e.g. ``0.8`` or
            ``[0.5, 0.9]``), once per window each.
        on_alert: a callable taking an :class:`~runguard.alerts.Alert`, or a
            webhook URL that receives it as JSON (default: a logging warning).
        on_store_error: ``"reject"`` (default) refuses calls while the store
            cannot be reached; ``"allow"`` lets them through with a warning.
        lease_seconds: how long a reservation holds its amount if its process
            dies before settling it.
    """

    def __init__(
        self,
        name: str,
        *,
        max_calls: int | None = None,
        max_input_tokens: int | None = None,
        max_output_tokens: int | None = None,
        max_total_tokens: int | None = None,
        max_cost_usd: float | None = None,
        period: Period = "day",
        store: Store | None = None,
        action: Action = "reject",
        alert_at: float | Sequence[float] | None = None,
        on_alert: OnAlert = None,
        on_store_error: OnStoreError = "reject",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"Budget name must be a str, got {type(name).__name__}")
        if not name or ":" in name:
            raise ValueError(f"Budget name must be non-empty and without ':', got {name!r}")
        self.name = name
        given = {
            "max_calls": max_calls,
            "max_input_tokens": max_input_tokens,
            "max_output_tokens": max_output_tokens,
            "max_total_tokens": max_total_tokens,
            "max_cost_usd": max_cost_usd,
        }
        self.limits = Limits._make(
            None if value is None else positive(field, value, field != "max_cost_usd")
            for field, value in given.items()
        )
        if all(limit is None for limit in self.limits):
            raise ValueError(f"Budget {name!r} needs at least one max_* ceiling")
        if period not in get_args(Period):
            raise ValueError(f"period must be one of {get_args(Period)}, got {period!r}")
        if action not in get_args(Action):
            raise ValueError(f"action must be 'reject' or 'alert', got {action!r}")
        if on_store_error not in get_args(OnStoreError):
            raise ValueError(f"on_store_error must be 'reject' or 'allow', got {on_store_error!r}")
        if store is not None and not isinstance(store, Store):
            raise TypeError(f"store must be a runguard store, got {type(store).__name__}")
        self.period: Period = period
        self.store: Store = store if store is not None else DEFAULT_STORE
        self.action: Action = action
        self.alert_at = check_thresholds(alert_at)
        self.on_alert = check_on_alert(on_alert)
        self.on_store_error: OnStoreError = on_store_error
        self.lease_seconds = positive("lease_seconds", lease_seconds, whole=False)
        self.needs_price = max_cost_usd is not None

    # -- windows -----------------------------------------------------------------

    def window(self, now: float) -> tuple[datetime, datetime]:
        """The UTC window containing ``now`` (seconds since the epoch): (start, end)."""
        at = datetime.fromtimestamp(now, timezone.utc)
        if self.period == "minute":
            start = at.replace(second=0, microsecond=0)
            return start, start + timedelta(minutes=1)
        if self.period == "hour":
            start = at.replace(minute=0, second=0, microsecond=0)
            return start, start + timedelta(hours=1)
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "day":
            return day, day + timedelta(days=1)
        if self.period == "week":
            start = day - timedelta(days=day.weekday())
            return start, start + timedelta(days=7)
        start = day.replace(day=1)
        following = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
        return start, following

    def key(self, start: datetime) -> str:
        return f"{self.name}:{self.period}:{start.strftime('%Y-%m-%dT%H:%M')}"

    # -- what a call asks and what crossing a ceiling says -----------------------

    def refusal(self, request: CallRequest, total: Amounts, ask: Amounts, end: datetime) -> str:
        over = [
            f"{_label(metric)} {_fmt(metric, _value(total + ask, metric))} over "
            f"{_fmt(metric, limit)}"
            for metric, limit in zip(_METRICS, self.limits, strict=True)
            if limit is not None and _value(total + ask, metric) > limit
        ]
        return (
            f"this {request.provider} call to {request.model} would bring the {self.period} "
            f"budget {self.name!r} to {', '.join(over)} ({self.store.name}); the budget "
            f"resets at {end.strftime('%Y-%m-%d %H:%M')} UTC"
        )

    def crossed(
        self, before: Amounts, after: Amounts, start: datetime, end: datetime, run: str | None
    ) -> list[tuple[str, Alert]]:
        """The alerts a settle from ``before`` to ``after`` crosses, each with its marker."""
        thresholds = self.alert_at if self.action == "reject" else (*self.alert_at, 1.0)
        found = []
        for metric, limit in zip(_METRICS, self.limits, strict=True):
            if limit is None:
                continue
            old, new = _value(before, metric), _value(after, metric)
            for threshold in thresholds:
                line = threshold * limit
                if old < line <= new:
                    alert = Alert(
                        source="budget",
                        name=self.name,
                        metric=metric,
                        threshold=threshold,
                        value=new,
                        limit=limit,
                        run=run,
                        window_start=start.isoformat(),
                        window_end=end.isoformat(),
                    )
                    found.append((f"{metric}@{threshold:g}", alert))
        return found

    def store_failed(self, error: BaseException, consequence: str) -> None:
        warnings.warn(
            f"runguard: the store of budget {self.name!r} ({self.store.name}) failed "
            f"({error!r}); {consequence}",
            RuntimeWarning,
            stacklevel=3,
        )

    def __repr__(self) -> str:
        limits = ", ".join(
            f"max_{m}={v!r}" if m != "calls" else f"max_calls={v!r}"
            for m, v in zip(_METRICS, self.limits, strict=True)
            if v is not None
        )
        return f"Budget({self.name!r}, {limits}, period={self.period!r}, action={self.action!r})"


def _value(amounts: Amounts, metric: str) -> float:
    return amounts.total_tokens if metric == "total_tokens" else getattr(amounts, metric)


def _label(metric: str) -> str:
    return {"calls": "calls", "cost_usd": "cost"}.get(metric, metric.replace("_", " "))


def _fmt(metric: str, value: float) -> str:
    return dollars(value) if metric == "cost_usd" else f"{int(value):,}"


class Lease(NamedTuple):
    """One budget's hold on a call, from admission until it settles."""

    budget: Budget
    key: str
    lease_id: str
    start: datetime
    end: datetime
    #: the name of the RunGuard that listed the budget
    run: str | None


def reserve(
    budgets: Sequence[tuple[Budget, Account]],
    request: CallRequest,
    usage_of: Callable[[Account], Usage],
) -> list[Lease]:
    """Hold the call's worst case in every budget, or hold nothing and raise.

    ``budgets`` pairs each budget with the account of the RunGuard that
    listed it; ``usage_of(account)`` is its usage, for the exception.
    """
    now = time.time()
    ask = Amounts(1, request.input_tokens, request.max_output_tokens, request.max_cost_usd or 0.0)
    leases: list[Lease] = []
    try:
        for budget, account in budgets:
            run = account.name
            start, end = budget.window(now)
            lease = Lease(budget, budget.key(start), uuid.uuid4().hex, start, end, run)
            if budget.action == "alert":
                leases.append(lease)  # reports only: nothing to hold
                continue
            try:
                admitted, total = budget.store.reserve(
                    lease.key,
                    ask,
                    budget.limits,
                    lease.lease_id,
                    now + budget.lease_seconds,
                    now,
                    end.timestamp(),
                )
            except Exception as error:
                if budget.on_store_error == "allow":
                    budget.store_failed(
                        error, "on_store_error='allow': the call is sent, uncounted"
                    )
                    continue
                trip = _unavailable(budget, run, error)
                raise BudgetUnavailable(trip, usage_of(account)) from error
            if not admitted:
                trip = _refused(budget, run, request, total, ask, end)
                raise BudgetExceeded(trip, usage_of(account))
            leases.append(lease)
    except BaseException:
        release(leases)
        raise
    return leases


def release(leases: Sequence[Lease]) -> None:
    """Give back held amounts of a call that was never sent."""
    for lease in leases:
        if lease.budget.action == "reject":
            try:
                lease.budget.store.settle(
                    lease.key, lease.lease_id, Amounts(), lease.end.timestamp()
                )
            except Exception as error:
                lease.budget.store_failed(error, "the unused hold lapses after lease_seconds")


def settle(leases: Sequence[Lease], actual: Amounts) -> list[tuple[Alert, OnAlert]]:
    """Replace each lease by what the call used; the alerts that crossed, once per window."""
    alerts: list[tuple[Alert, OnAlert]] = []
    for lease in leases:
        budget = lease.budget
        expire = lease.end.timestamp()
        try:
            after = budget.store.settle(lease.key, lease.lease_id, actual, expire)
            before = Amounts._make(a - b for a, b in zip(after, actual, strict=True))
            for marker, alert in budget.crossed(before, after, lease.start, lease.end, lease.run):
                if budget.store.first(lease.key, marker, expire):
                    alerts.append((alert, budget.on_alert))
        except Exception as error:  # too late to refuse: the call has been made
            budget.store_failed(
                error, "this call is not counted there; its hold lapses after lease_seconds"
            )
    return alerts


def _refused(
    budget: Budget,
    run: str | None,
    request: CallRequest,
    total: Amounts,
    ask: Amounts,
    end: datetime,
) -> Trip:
    metric, limit = next(
        (m, v)
        for m, v in zip(_METRICS, budget.limits, strict=True)
        if v is not None and _value(total + ask, m) > v
    )
    return Trip(
        guard=f"budget:{budget.name}",
        reason=budget.refusal(request, total, ask, end),
        limit=limit,
        observed=_value(total + ask, metric),
        run=run,
        exception=BudgetExceeded,
        details={
            "budget": budget.name,
            "period": budget.period,
            "metric": metric,
            "store": budget.store.name,
            "resets_at": end.isoformat(),
        },
    )


def _unavailable(budget: Budget, run: str | None, error: BaseException) -> Trip:
    return Trip(
        guard=f"budget:{budget.name}",
        reason=(
            f"the store of budget {budget.name!r} ({budget.store.name}) could not be reached "
            f"({type(error).__name__}: {error}); the call was not sent (on_store_error='reject')"
        ),
        limit=0,
        observed=0,
        run=run,
        exception=BudgetUnavailable,
        details={"budget": budget.name, "store": budget.store.name, "error": repr(error)},
    )
