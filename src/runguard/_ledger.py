"""The ledger: what each RunGuard has spent and reserved. The one lock lives here.

Admission and settlement of a call touch every active RunGuard under this
single lock, so nested guards and racing threads or tasks see one consistent
order of events: under 64 threads against ``max_calls=100``, exactly 100
calls are admitted.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from itertools import count
from typing import TYPE_CHECKING, Any

from ._errors import GuardTripped
from ._records import ArtifactWrite, Attempt, CallRequest, CallResult, Trip, Usage
from .alerts import Alert, OnAlert
from .guards._inert import judging
from .guards.ceiling import Ceiling, checks
from .steps import Breakdown

if TYPE_CHECKING:
    from .budgets import Budget
    from .guards import Guard
    from .pricing import Rates

log = logging.getLogger("runguard")
_serials = count(1)


def next_serial() -> int:
    """Ever larger numbers: a guard entered later is inner to one entered earlier."""
    return next(_serials)


class Account:
    """A RunGuard's running totals, as its guards see them.

    Plain attributes, read by guards under the ledger's lock and written only
    by the ledger. ``reserved_*`` is the worst case of calls admitted but not
    yet settled.
    """

    __slots__ = (
        "admitted_guards",
        "admitting",
        "alert_at",
        "artifact_bytes",
        "artifact_guards",
        "artifact_writes",
        "artifacts",
        "attempt_guards",
        "attempts_stopped",
        "budgets",
        "cache_read_tokens",
        "cache_write_tokens",
        "calls",
        "consecutive_rate_limited",
        "consolidates",
        "cost_usd",
        "entered_at",
        "estimated_calls",
        "fired",
        "guards",
        "input_tokens",
        "llm_seconds",
        "name",
        "needs_fingerprint",
        "needs_price",
        "needs_tool_calls",
        "on_alert",
        "output_tokens",
        "owner",
        "prices",
        "rate_limited_attempts",
        "reserved_calls",
        "reserved_cost_usd",
        "reserved_input_tokens",
        "reserved_output_tokens",
        "rows",
        "serial",
        "settling",
        "state",
        "trip",
        "unpriced_calls",
    )

    def __init__(
        self,
        name: str | None,
        guards: Sequence[Guard],
        prices: Mapping[str, Rates | str],
        budgets: Sequence[Budget] = (),
        alert_at: tuple[float, ...] = (),
        on_alert: OnAlert = None,
    ) -> None:
        self.name = name
        self.budgets = tuple(budgets)
        #: fractions of each keyword ceiling to warn at, and where warnings go
        self.alert_at = alert_at
        self.on_alert = on_alert
        #: (ceiling name, fraction) pairs already warned about
        self.fired: set[tuple[str, float]] = set()
        #: (step, role, model) -> that slice's totals, in Usage's field order
        self.rows: dict[tuple[str | None, str | None, str], list[float]] = {}
        self.guards = tuple(guards)
        #: the guards as admit() and settle() run them: ceilings fused into one
        #: check, and methods that let every call go left out
        fused = checks(self.guards)
        self.admitting = judging(fused, "admit")
        self.settling = judging(fused, "settled")
        self.prices = prices
        self.needs_price = any(getattr(g, "needs_price", False) for g in self.guards) or any(
            b.needs_price for b in self.budgets
        )
        #: whether providers must fingerprint requests / read tool calls for these guards
        self.needs_fingerprint = any(getattr(g, "needs_fingerprint", False) for g in self.guards)
        self.needs_tool_calls = any(getattr(g, "needs_tool_calls", False) for g in self.guards)
        #: the guards that watch every HTTP attempt (``attempted`` is optional)
        self.attempt_guards: tuple[Any, ...] = tuple(
            g for g in self.guards if callable(getattr(g, "attempted", None))
        )
        #: the guards told of each call once every RunGuard admitted it (optional hook)
        self.admitted_guards: tuple[Any, ...] = tuple(
            g for g in self.guards if callable(getattr(g, "admitted", None))
        )
        #: artifacts held for one consolidated write at exit: (run, entry) pairs
        #: in call order; small ``log_text``/``log_dict`` calls join them when
        #: ``consolidates``, tool outputs always do
        self.artifacts: list[tuple[object, dict[str, Any]]] = []
        self.consolidates = False
        #: the guards that judge artifact writes (``admit_artifact`` is optional)
        self.artifact_guards: tuple[Any, ...] = tuple(
            g for g in self.guards if callable(getattr(g, "admit_artifact", None))
        )
        #: per-guard memory (loop windows), keyed by the guard object, so one
        #: guard object can serve many RunGuards (``@guarded``) independently
        self.state: dict[object, Any] = {}
        #: the trip of a guard that tripped on an HTTP attempt: no attempt may be sent
        #: any more, not even the pending retry of a call admitted before the trip
        self.attempts_stopped: Trip | None = None
        #: ``time.monotonic()`` when the RunGuard was entered
        self.entered_at = 0.0
        self.serial = 0  # set when its RunGuard is entered
        #: the RunGuard this account belongs to (for ``current_guard()``)
        self.owner: object = None
        self.trip: Trip | None = None
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0
        self.cost_usd = 0.0
        self.llm_seconds = 0.0
        self.estimated_calls = 0
        self.unpriced_calls = 0
        self.rate_limited_attempts = 0
        self.consecutive_rate_limited = 0
        self.artifact_writes = 0
        self.artifact_bytes = 0
        self.reserved_calls = 0
        self.reserved_input_tokens = 0
        self.reserved_output_tokens = 0
        self.reserved_cost_usd = 0.0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def reserved_total_tokens(self) -> int:
        return self.reserved_input_tokens + self.reserved_output_tokens

    def usage(self) -> Usage:
        return Usage(
            calls=self.calls,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            cost_usd=self.cost_usd,
            llm_seconds=self.llm_seconds,
            estimated_calls=self.estimated_calls,
            unpriced_calls=self.unpriced_calls,
            rate_limited_attempts=self.rate_limited_attempts,
            artifact_writes=self.artifact_writes,
            artifact_bytes=self.artifact_bytes,
        )


class Reservation:
    """A call's worst case held in every active account from admission until it settles.

    ``open`` is True between a successful :meth:`Ledger.admit` and the first
    :meth:`Ledger.settle`. The subclass (``_call.Call``) sets all three fields
    in its own ``__init__``, which runs on every LLM call.
    """

    __slots__ = ("accounts", "open", "request")

    accounts: tuple[Account, ...]
    request: CallRequest
    open: bool


class Ledger:
    """Reserves before a call and settles after it, for every active RunGuard at once."""

    def __init__(self) -> None:
        # Reentrant only so that a thread can tell it holds the lock: the garbage
        # collector can run a stream's settlement in the middle of any ledger method
        # (see Call.finish), which must then be deferred. No ledger method nests.
        self._lock = threading.RLock()
        #: whether the calling thread is inside a ledger method
        self.held_here: Callable[[], bool] = self._lock._is_owned  # type: ignore[attr-defined]
        #: RunGuards with ``scope="process"``, innermost first.
        self.process: tuple[Account, ...] = ()

    def attach(self, account: Account) -> None:
        with self._lock:
            self.process = (account, *self.process)

    def detach(self, account: Account) -> None:
        with self._lock:
            self.process = tuple(a for a in self.process if a is not account)

    def snapshot(self, account: Account) -> Usage:
        with self._lock:
            return account.usage()

    def admit(self, reservation: Reservation) -> None:
        """Reserve the request's worst case in every account, or raise and reserve nothing."""
        accounts = reservation.accounts
        request = reservation.request
        refused: tuple[Account, Trip] | None = None
        with self._lock:
            for account in accounts:
                trip = account.trip
                if trip is None:
                    for guard in account.admitting:
                        trip = guard.admit(request, account)
                        if trip is not None:
                            trip = account.trip = _own(trip, account)
                            break
                if trip is not None:
                    refused = account, trip
                    usage = account.usage()
                    break
            else:
                cost = request.max_cost_usd or 0.0
                for account in accounts:
                    account.reserved_calls += 1
                    account.reserved_input_tokens += request.input_tokens
                    account.reserved_output_tokens += request.max_output_tokens
                    account.reserved_cost_usd += cost
                reservation.open = True
                try:
                    for account in accounts:
                        for guard in account.admitted_guards:
                            guard.admitted(request, account)
                except BaseException:
                    # a guard of the user's failed: the call is not sent, and what the
                    # guards before it counted is taken back
                    _withdraw(reservation, stop=(guard, account))
                    _unreserve(reservation)
                    raise
                return
        raise _exception(refused[1], usage)

    def settle(self, reservation: Reservation, result: CallResult) -> list[tuple[Alert, OnAlert]]:
        """Release the reservation and charge the call's usage; latch guards it pushed over.

        Only the first settlement of a reservation counts: a stream may be
        settled by its end, its close and its garbage collection alike.
        Returns the alerts the call crossed, to be delivered outside the lock.
        """
        request = reservation.request
        usage = result.usage
        alerts: list[tuple[Alert, OnAlert]] = []
        with self._lock:
            if not _unreserve(reservation):
                return alerts
            # A call's usage has nothing in its last three fields (attempts and
            # artifacts are counted elsewhere). Read once into locals, its fields
            # are added in place below: cheaper than reading a named tuple's
            # fields, or a new row made with map(add) on every call.
            calls, fed, made, read, written, cost, seconds, estimated, unpriced = usage[:9]
            key = (request.step, request.role, result.model or request.model)
            for account in reservation.accounts:
                account.calls += calls
                account.input_tokens += fed
                account.output_tokens += made
                account.cache_read_tokens += read
                account.cache_write_tokens += written
                account.cost_usd += cost
                account.llm_seconds += seconds
                account.estimated_calls += estimated
                account.unpriced_calls += unpriced
                row = account.rows.get(key)
                if row is None:
                    account.rows[key] = list(usage)
                else:
                    row[0] += calls
                    row[1] += fed
                    row[2] += made
                    row[3] += read
                    row[4] += written
                    row[5] += cost
                    row[6] += seconds
                    row[7] += estimated
                    row[8] += unpriced
                if account.alert_at:
                    alerts.extend((a, account.on_alert) for a in _crossed(account))
                if account.trip is None:
                    for guard in account.settling:
                        try:
                            trip = guard.settled(request, result, account)
                        except Exception:
                            # a user's guard failed: the call was sent and paid for, so its
                            # answer is returned and every covering guard still charged
                            log.exception("runguard: guard %r failed to judge a call", guard)
                            continue
                        if trip is not None:
                            account.trip = _own(trip, account)
                            break
        return alerts

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation without charging anything (a call that was never sent)."""
        with self._lock:
            if reservation.open:
                _withdraw(reservation)
            _unreserve(reservation)

    def breakdown(self, account: Account) -> Breakdown:
        with self._lock:
            rows = {key: Usage._make(row) for key, row in account.rows.items()}
        return Breakdown(rows)

    def attempted(self, reservation: Reservation, attempt: Attempt) -> None:
        """Count one answered HTTP attempt of an admitted call; raise to end the call.

        A 429 adds to the totals and to the current streak; any other status
        ends the streak. An error answer raises when an attempt guard has
        tripped (now, or before, on another call), which stops the SDK's
        retries; a success is never thrown away, since it has been paid for.
        """
        refused: tuple[Account, Trip] | None = None
        with self._lock:
            for account in reservation.accounts:
                if attempt.status == 429:
                    account.rate_limited_attempts += 1
                    account.consecutive_rate_limited += 1
                else:
                    account.consecutive_rate_limited = 0
                stopped = account.attempts_stopped
                # A ceiling's trip lets calls admitted before it finish, but their
                # attempts are still judged: a 429 storm among them must end too.
                if stopped is None:
                    for guard in account.attempt_guards:
                        trip = guard.attempted(reservation.request, attempt, account)
                        if trip is not None:
                            stopped = account.attempts_stopped = _own(trip, account)
                            if account.trip is None:
                                account.trip = stopped
                            break
                if stopped is not None and refused is None and attempt.status >= 400:
                    refused = account, stopped
            if refused is None:
                return
            usage = refused[0].usage()
        raise _exception(refused[1], usage)

    def refuse_if_stopped(self, reservation: Reservation) -> None:
        """Before an HTTP attempt: raise if a guard of the call tripped on an attempt.

        A ceiling's trip refuses new calls but lets calls admitted before it
        finish; a trip on an attempt (a 429 storm, an upstream budget) stops
        every attempt, retries of admitted calls included.
        """
        for account in reservation.accounts:
            stopped = account.attempts_stopped
            if stopped is not None:
                raise _exception(stopped, self.snapshot(account))

    def write_artifact(self, accounts: tuple[Account, ...], write: ArtifactWrite) -> None:
        """Count an artifact write in every account, or raise and count nothing.

        Only artifact guards judge a write: a RunGuard latched by an LLM
        ceiling still lets the agent save its work.
        """
        with self._lock:
            for account in accounts:
                for guard in account.artifact_guards:
                    trip = guard.admit_artifact(write, account)
                    if trip is not None:
                        trip = _own(trip, account)
                        if account.trip is None:
                            account.trip = trip
                        usage = account.usage()
                        break
                else:
                    continue
                break
            else:
                for account in accounts:
                    account.artifact_writes += write.files
                    account.artifact_bytes += write.size
                return
        raise _exception(trip, usage)

    def latch(self, account: Account, trip: Trip) -> Trip:
        """Trip ``account`` unless it already tripped; returns the trip in force."""
        with self._lock:
            if account.trip is None:
                account.trip = _own(trip, account)
            return account.trip


def _withdraw(reservation: Reservation, stop: tuple[Any, Account] | None = None) -> None:
    """Tell the guards ``admitted`` was called for that the call is not sent after all.

    ``stop``: the (guard, account) whose ``admitted`` failed; the guards from it on
    were not told of the call.
    """
    request = reservation.request
    for account in reservation.accounts:
        for guard in account.admitted_guards:
            if stop is not None and guard is stop[0] and account is stop[1]:
                return
            withdrawn = getattr(guard, "withdrawn", None)
            if callable(withdrawn):
                try:
                    withdrawn(request, account)
                except Exception:  # the reservation must still be given back
                    log.exception("runguard: guard %r failed to withdraw a call", guard)


def _unreserve(reservation: Reservation) -> bool:
    """Take the reservation's worst case back out of its accounts (under the lock).

    False if it was already taken out: a reservation is closed only once.
    """
    if not reservation.open:
        return False
    reservation.open = False
    request = reservation.request
    cost = request.max_cost_usd or 0.0
    for account in reservation.accounts:
        account.reserved_calls -= 1
        account.reserved_input_tokens -= request.input_tokens
        account.reserved_output_tokens -= request.max_output_tokens
        account.reserved_cost_usd -= cost
        if account.reserved_calls == 0:
            # float sums of +x then -x need not return to exactly 0
            account.reserved_cost_usd = 0.0
    return True


def _crossed(account: Account) -> list[Alert]:
    """Alerts for the keyword ceilings' thresholds this account has just reached."""
    found = []
    for guard in account.guards:
        if not isinstance(guard, Ceiling):
            continue
        value = guard.used(account)
        for threshold in account.alert_at:
            if value >= threshold * guard.limit and (guard.name, threshold) not in account.fired:
                account.fired.add((guard.name, threshold))
                found.append(
                    Alert(
                        source="guard",
                        name=guard.name,
                        metric=guard.metric,
                        threshold=threshold,
                        value=value,
                        limit=guard.limit,
                        run=account.name,
                    )
                )
    return found


def _own(trip: Trip, account: Account) -> Trip:
    if trip.run == account.name:
        return trip
    return dataclasses.replace(trip, run=account.name)


def _exception(trip: Trip, usage: Usage) -> GuardTripped:
    return (trip.exception or GuardTripped)(trip, usage)


def raise_trip(account: Account, ledger: Ledger) -> None:
    """Raise the exception for ``account``'s trip, with its usage now."""
    trip = account.trip
    if trip is not None:
        raise _exception(trip, ledger.snapshot(account))


LEDGER = Ledger()
