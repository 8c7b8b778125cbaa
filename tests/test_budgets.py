"""Shared budgets (``runguard.Budget``) over the real ``openai`` and ``anthropic`` SDKs.

Ground truth is what reached the fake provider (``fake.wire_count``) and the
usage the scripted :class:`Reply` sent back; dollars come from
``genai_prices.calc_price`` (or, for a model priced with ``runguard.Price``,
from that price times the tokens the fake reported). What a budget holds is
read back from its store through the store protocol itself (a zero-sized
reservation), never from private attributes. Calendar windows are checked
against dates written out independently of ``Budget.window``; time is moved
by replacing the clock of ``runguard.budgets`` only.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import genai_prices
import openai
import pytest

import runguard
import runguard.budgets
from runguard import (
    Alert,
    Budget,
    BudgetExceeded,
    BudgetUnavailable,
    GuardTripped,
    Price,
    RunGuard,
    propagate,
)
from runguard.stores import Amounts, Limits, MemoryStore, Store
from runguard.testing import FakeProvider, Reply

UTC = timezone.utc
MODEL = "gpt-4o-mini"
REPLY = Reply(input_tokens=40, output_tokens=6)
#: noon on a Sunday in June; its minute, hour, day, week and month are all mid-window
NOON = datetime(2025, 6, 15, 12, 20, 30, tzinfo=UTC)


# -- helpers ---------------------------------------------------------------------


def catalogue_price(model: str, provider: str = "openai", **tokens: int) -> float:
    """The price genai-prices itself gives for these tokens (the reference for cost_usd)."""
    usage = genai_prices.Usage(**tokens)
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


def ask(client: Any, max_tokens: int | None = 16, model: str = MODEL, content: str = "hi") -> Any:
    request: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    return client.chat.completions.create(**request)


def try_ask(client: Any, **kwargs: Any) -> bool:
    """One call; True if it was sent, False if a budget (or guard) refused it."""
    try:
        ask(client, **kwargs)
    except BudgetExceeded:
        return False
    return True


def calls_until_refused(client: Any, limit: int = 1000, **kwargs: Any) -> int:
    """Make calls until one is refused; how many were admitted."""
    for n in range(limit):
        if not try_ask(client, **kwargs):
            return n
    raise AssertionError(f"no call was refused in {limit} tries")


def held(budget: Budget) -> Amounts:
    """What ``budget`` holds in its store now (spent plus leases), via the store protocol.

    A zero-sized reservation under no limits is always admitted and answers
    the totals before it; settling it with nothing adds nothing.
    """
    now = runguard.budgets.time.time()
    start, end = budget.window(now)
    key, probe = budget.key(start), f"probe-{uuid.uuid4().hex}"
    admitted, total = budget.store.reserve(
        key, Amounts(), Limits(), probe, now + 60, now, end.timestamp()
    )
    assert admitted
    budget.store.settle(key, probe, Amounts(), end.timestamp())
    return total


def assert_held(budget: Budget, calls: int, reply: Reply = REPLY, model: str = MODEL) -> None:
    """``budget`` holds exactly ``calls`` calls answered with ``reply``, priced by genai-prices."""
    cost = catalogue_price(
        model, input_tokens=reply.input_tokens, output_tokens=reply.output_tokens
    )
    assert held(budget) == (
        calls,
        calls * reply.input_tokens,
        calls * reply.output_tokens,
        pytest.approx(calls * cost),
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Clock:
    """Stands in for the ``time`` module inside ``runguard.budgets`` (and only there)."""

    def __init__(self, at: datetime) -> None:
        self.now = at.timestamp()

    def time(self) -> float:
        return self.now

    def set(self, at: datetime) -> None:
        self.now = at.timestamp()

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakyStore:
    """A MemoryStore behind a switch: listed operations raise ConnectionError."""

    name = "flaky://budgets"

    def __init__(self, failing: tuple[str, ...] = ("reserve", "settle", "first")) -> None:
        self.inner = MemoryStore()
        self.failing = set(failing)
        self.attempts: list[str] = []

    def _maybe_fail(self, operation: str) -> None:
        self.attempts.append(operation)
        if operation in self.failing:
            raise ConnectionError(f"{self.name} is down")

    def reserve(self, *args: Any) -> tuple[bool, Amounts]:
        self._maybe_fail("reserve")
        return self.inner.reserve(*args)

    def settle(self, *args: Any) -> Amounts:
        self._maybe_fail("settle")
        return self.inner.settle(*args)

    def first(self, *args: Any) -> bool:
        self._maybe_fail("first")
        return self.inner.first(*args)


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=REPLY)


@pytest.fixture
def client(fake: FakeProvider) -> Any:
    return fake.openai(max_retries=0)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A settable clock for the budgets module; the SDKs and the fake keep the real one."""
    fake_clock = Clock(NOON)
    monkeypatch.setattr(runguard.budgets, "time", fake_clock)
    return fake_clock


# -- a reject budget across RunGuards ---------------------------------------------------


def test_reject_budget_is_shared_by_several_runguards(
    fake: FakeProvider, client: Any, store: MemoryStore, clock: Clock
) -> None:
    team = Budget("team", max_calls=5, period="hour", store=store)
    with RunGuard(budgets=[team], name="run-1") as first:
        ask(client)
        ask(client)
    with RunGuard(budgets=[team], name="run-2"):
        ask(client)
        ask(client)
    with RunGuard(budgets=[team], name="run-3") as third:
        ask(client)
        with pytest.raises(BudgetExceeded) as info:
            ask(client)
    assert fake.wire_count == 5
    assert first.usage.calls == 2
    assert third.usage.calls == 1

    trip = info.value.trip
    assert trip.guard == "budget:team"
    assert trip.run == "run-3"
    assert (trip.limit, trip.observed) == (5, 6)
    assert dict(trip.details) == {
        "budget": "team",
        "period": "hour",
        "metric": "calls",
        "store": "memory",
        "resets_at": "2025-06-15T13:00:00+00:00",
    }
    message = str(info.value)
    assert "'team'" in message
    assert "resets at 2025-06-15 13:00 UTC" in message
    assert info.value.usage.calls == 1  # what run-3 had spent when refused
    assert_held(team, 5)


def test_budget_objects_with_the_same_name_and_store_share_totals(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    one = Budget("shared", max_calls=3, store=store)
    two = Budget("shared", max_calls=3, store=store)
    with RunGuard(budgets=[one]):
        ask(client)
        ask(client)
    with RunGuard(budgets=[two]):
        assert calls_until_refused(client) == 1
    assert fake.wire_count == 3

    # another name, or the same name in another store, starts from zero
    with RunGuard(budgets=[Budget("other", max_calls=3, store=store)]):
        assert calls_until_refused(client) == 3
    with RunGuard(budgets=[Budget("shared", max_calls=3, store=MemoryStore())]):
        assert calls_until_refused(client) == 3
    assert fake.wire_count == 9


def test_the_default_store_is_shared_by_the_whole_process(fake: FakeProvider, client: Any) -> None:
    name = unique("default-store")
    one, two = Budget(name, max_calls=2), Budget(name, max_calls=2)
    assert one.store is runguard.budgets.DEFAULT_STORE
    assert two.store is one.store
    assert isinstance(one.store, MemoryStore)
    with RunGuard(budgets=[one]):
        ask(client)
    with RunGuard(budgets=[two]):
        assert calls_until_refused(client) == 1
    assert fake.wire_count == 2


def test_a_budget_refusal_does_not_latch_the_runguard(
    fake: FakeProvider, client: Any, store: MemoryStore, clock: Clock
) -> None:
    clock.set(datetime(2025, 6, 15, 12, 20, 50, tzinfo=UTC))
    minute = Budget("per-minute", max_calls=2, period="minute", store=store)
    with RunGuard(max_calls=10, budgets=[minute]) as guard:
        ask(client)
        ask(client)
        with pytest.raises(BudgetExceeded) as info:
            ask(client)
        assert info.value.trip.details["resets_at"] == "2025-06-15T12:21:00+00:00"
        assert not guard.tripped
        clock.set(datetime(2025, 6, 15, 12, 21, 0, tzinfo=UTC))
        ask(client)  # a new window: the same RunGuard sends again
    # leaving the block raises nothing: the RunGuard itself never tripped
    assert guard.trip is None
    assert fake.wire_count == 3
    assert guard.usage.calls == 3


# -- what a call reserves, and what it settles to ------------------------------------------


def test_an_uncapped_call_reserves_4096_output_tokens(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    tight = Budget("tight", max_output_tokens=4095, store=store)
    with RunGuard(budgets=[tight]):
        with pytest.raises(BudgetExceeded) as info:
            ask(client, max_tokens=None)
        assert fake.wire_count == 0
        assert info.value.trip.details["metric"] == "output_tokens"
        assert info.value.trip.observed == 4096
        ask(client, max_tokens=4095)  # a capped call reserves only its cap
    assert fake.wire_count == 1

    roomy = Budget("roomy", max_output_tokens=4096, store=store)
    with RunGuard(budgets=[roomy]):
        ask(client, max_tokens=None)
    assert fake.wire_count == 2
    # once settled, the budget holds what the answer reported, not the 4096 reserved
    assert held(roomy).output_tokens == REPLY.output_tokens


def test_a_dollar_budget_reserves_the_priced_worst_case(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    with pytest.raises(BudgetExceeded) as probe, RunGuard(max_input_tokens=1):
        ask(client, max_tokens=200)
    estimate = int(probe.value.trip.observed)
    worst = catalogue_price(MODEL, input_tokens=estimate, output_tokens=200)

    short = Budget("short", max_cost_usd=worst * 0.99, store=store)
    with pytest.raises(BudgetExceeded) as info, RunGuard(budgets=[short]):
        ask(client, max_tokens=200)
    assert fake.wire_count == 0
    assert info.value.trip.details["metric"] == "cost_usd"
    assert info.value.trip.observed == pytest.approx(worst)

    enough = Budget("enough", max_cost_usd=worst * 1.01, store=store)
    with RunGuard(budgets=[enough]):
        ask(client, max_tokens=200)
    assert fake.wire_count == 1
    real = catalogue_price(
        MODEL, input_tokens=REPLY.input_tokens, output_tokens=REPLY.output_tokens
    )
    assert held(enough).cost_usd == pytest.approx(real)


@pytest.mark.parametrize("mode", ["propagated", "guard-per-thread"])
def test_in_flight_calls_hold_their_leases(mode: str, store: MemoryStore) -> None:
    """16 threads start together against max_calls=5; replies are slow, so all overlap."""
    fake = FakeProvider(default=Reply(input_tokens=40, output_tokens=6, delay=0.05))
    client = fake.openai(max_retries=0)
    budget = Budget("in-flight", max_calls=5, store=store)
    barrier = threading.Barrier(16)
    outcomes: list[bool] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait(timeout=10)
            if mode == "guard-per-thread":
                with RunGuard(budgets=[budget]):
                    outcomes.append(try_ask(client))
            else:
                outcomes.append(try_ask(client))
        except BaseException as exc:  # report, never hide
            errors.append(exc)

    with RunGuard(budgets=[budget] if mode == "propagated" else []):
        target = propagate(work) if mode == "propagated" else work
        threads = [threading.Thread(target=target) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert fake.wire_count == 5
    assert sorted(outcomes) == [False] * 11 + [True] * 5
    assert_held(budget, 5, fake.default)


@pytest.mark.parametrize("real_input", [100, 1], ids=["usage-above-estimate", "usage-below"])
def test_settle_replaces_the_reservation_with_real_usage(
    real_input: int, store: MemoryStore
) -> None:
    fake = FakeProvider(default=Reply(input_tokens=real_input, output_tokens=3))
    client = fake.openai(max_retries=0)
    with pytest.raises(BudgetExceeded) as probe, RunGuard(max_input_tokens=1):
        ask(client)
    estimate = int(probe.value.trip.observed)  # what each call reserves
    assert estimate not in (real_input, 0)
    limit = 4 * max(estimate, real_input) + estimate // 2

    # the store admits a call while spent + this call's estimate fits
    expected, spent = 0, 0
    while spent + estimate <= limit:
        spent += real_input
        expected += 1

    budget = Budget("settled", max_input_tokens=limit, store=store)
    with RunGuard(budgets=[budget]):
        assert calls_until_refused(client) == expected
    assert fake.wire_count == expected
    assert held(budget).input_tokens == expected * real_input


def test_a_failed_call_settles_its_lease(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    budget = Budget("failing-calls", max_calls=3, max_output_tokens=100, store=store)
    fake.script(Reply(status=500))
    with RunGuard(budgets=[budget]):
        with pytest.raises(openai.InternalServerError):
            ask(client, max_tokens=100)
        assert fake.wire_count == 1
        # counted as a call, with the no tokens an error answer reports; nothing left held
        assert held(budget) == Amounts(1, 0, 0, 0.0)
        ask(client, max_tokens=100)
    assert fake.wire_count == 2


# -- nesting: run ⊂ team ⊂ org -------------------------------------------------------------


def test_nested_budgets_each_admit_and_each_is_charged(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    org = Budget("org", max_calls=100, store=store)
    team = Budget("team", max_calls=3, store=store)
    run = Budget("run", max_calls=10, store=store)
    with (
        pytest.raises(BudgetExceeded) as info,
        RunGuard(budgets=[org], name="org-guard"),
        RunGuard(budgets=[team], name="team-guard"),
        RunGuard(budgets=[run], name="run-guard"),
    ):
        for _ in range(10):
            ask(client)
    assert fake.wire_count == 3
    assert info.value.trip.guard == "budget:team"
    assert info.value.trip.run == "team-guard"  # the RunGuard that listed the budget
    for budget in (org, team, run):
        assert_held(budget, 3)


def test_a_budget_refusal_carries_the_usage_of_the_runguard_that_listed_it(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    # GuardTripped.usage is what the RunGuard named in trip.run had spent: for a
    # budget refusal, the RunGuard that listed the budget (here the outer one,
    # 4 calls), not the innermost (2 calls).
    org = Budget("org", max_calls=4, store=store)
    with RunGuard(budgets=[org], name="org-guard") as outer:
        ask(client)
        ask(client)
        with RunGuard(name="inner"):
            ask(client)
            with pytest.raises(BudgetExceeded) as info:
                ask(client)
                ask(client)
    assert fake.wire_count == 4
    assert info.value.trip.run == "org-guard"
    assert info.value.usage.calls == outer.usage.calls == 4


def test_an_outer_budget_refusal_releases_the_inner_leases(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    org = Budget("org", max_calls=2, store=store)
    team = Budget("team", max_output_tokens=100, store=store)
    with RunGuard(budgets=[org], name="org-guard"), RunGuard(budgets=[team]):
        ask(client, max_tokens=60)
        ask(client, max_tokens=60)
        # team (inner) reserves 60 more first, then org refuses the call
        with pytest.raises(BudgetExceeded) as info:
            ask(client, max_tokens=60)
    assert info.value.trip.guard == "budget:org"
    assert fake.wire_count == 2
    # the refused call left no lease behind in team
    assert held(team).output_tokens == 2 * REPLY.output_tokens
    with RunGuard(budgets=[team]):
        ask(client, max_tokens=100 - 2 * REPLY.output_tokens)
    assert fake.wire_count == 3


def test_a_second_budget_refusing_releases_the_first_budgets_lease(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    roomy = Budget("roomy", max_output_tokens=100, store=store)
    spent = Budget("spent", max_calls=1, store=store)
    with RunGuard(budgets=[spent]):
        ask(client)
    with RunGuard(budgets=[roomy, spent]):
        for _ in range(3):
            with pytest.raises(BudgetExceeded) as info:
                ask(client, max_tokens=60)
            assert info.value.trip.guard == "budget:spent"
    assert held(roomy) == Amounts()  # three refused calls, no lease left
    with RunGuard(budgets=[roomy]):
        ask(client, max_tokens=60)
        ask(client, max_tokens=100 - REPLY.output_tokens)
    assert fake.wire_count == 3


def test_a_runguard_refusal_reserves_nothing_in_its_budgets(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    budget = Budget("untouched", max_calls=5, store=store)
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_calls=1, budgets=[budget]):
        ask(client)
        ask(client)
    assert info.value.trip.guard == "max_calls"
    assert held(budget).calls == 1


def test_the_same_budget_at_two_levels_is_charged_once_per_call(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    shared = Budget("shared", max_calls=3, store=store)
    with RunGuard(budgets=[shared]), RunGuard(budgets=[shared]):
        assert calls_until_refused(client) == 3
    assert fake.wire_count == 3
    assert held(shared).calls == 3


def test_the_same_budget_listed_twice_in_one_runguard_is_charged_once(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    # RunGuard(budgets=[b, b]) (concatenated budget lists) charges b once per
    # call, as listing it at two nesting levels does.
    shared = Budget("twice", max_calls=3, store=store)
    with RunGuard(budgets=[shared, shared]):
        sent = calls_until_refused(client)
    assert held(shared).calls == fake.wire_count
    assert sent == 3


# -- calendar windows ------------------------------------------------------------------


def _utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


WINDOWS = [
    # period, a moment, the window's start and end written out by hand
    ("minute", _utc(2024, 2, 29, 23, 59, 59), _utc(2024, 2, 29, 23, 59), _utc(2024, 3, 1)),
    ("minute", _utc(2025, 6, 15, 12, 20), _utc(2025, 6, 15, 12, 20), _utc(2025, 6, 15, 12, 21)),
    ("hour", _utc(2024, 12, 31, 23, 30), _utc(2024, 12, 31, 23), _utc(2025, 1, 1)),
    ("hour", _utc(2025, 6, 15, 12, 59, 59), _utc(2025, 6, 15, 12), _utc(2025, 6, 15, 13)),
    ("day", _utc(2024, 2, 28, 23, 59, 59), _utc(2024, 2, 28), _utc(2024, 2, 29)),
    ("day", _utc(2024, 2, 29, 12), _utc(2024, 2, 29), _utc(2024, 3, 1)),
    # 2024-03-03 is a Sunday: its week began on Monday 2024-02-26
    ("week", _utc(2024, 3, 3, 23, 59, 59), _utc(2024, 2, 26), _utc(2024, 3, 4)),
    ("week", _utc(2024, 3, 4), _utc(2024, 3, 4), _utc(2024, 3, 11)),
    ("week", _utc(2024, 12, 31, 9), _utc(2024, 12, 30), _utc(2025, 1, 6)),
    ("month", _utc(2024, 12, 31, 23, 59, 59), _utc(2024, 12, 1), _utc(2025, 1, 1)),
    ("month", _utc(2024, 2, 29, 8), _utc(2024, 2, 1), _utc(2024, 3, 1)),
    ("month", _utc(2023, 2, 28, 8), _utc(2023, 2, 1), _utc(2023, 3, 1)),
    ("month", _utc(2024, 1, 31, 8), _utc(2024, 1, 1), _utc(2024, 2, 1)),
    ("month", _utc(2025, 7, 1), _utc(2025, 7, 1), _utc(2025, 8, 1)),
]


@pytest.mark.parametrize(("period", "moment", "start", "end"), WINDOWS)
def test_windows_are_calendar_aligned_in_utc(
    period: str, moment: datetime, start: datetime, end: datetime
) -> None:
    budget = Budget("w", max_calls=1, period=period, store=MemoryStore())
    assert budget.window(moment.timestamp()) == (start, end)
    assert budget.window(moment.timestamp())[0].utcoffset() == timedelta(0)
    # the last instant of a window belongs to it; its end opens the next one
    assert budget.window(end.timestamp() - 0.001) == (start, end)
    assert budget.window(end.timestamp())[0] == end
    assert budget.key(start) != budget.key(end)
    assert budget.key(start) == budget.key(budget.window(end.timestamp() - 0.001)[0])


# period, a window's start, its end (by hand)
BOUNDARIES = [
    ("minute", _utc(2025, 6, 15, 12, 20), _utc(2025, 6, 15, 12, 21)),
    ("hour", _utc(2025, 6, 15, 12), _utc(2025, 6, 15, 13)),
    ("day", _utc(2025, 6, 15), _utc(2025, 6, 16)),
    ("week", _utc(2025, 6, 9), _utc(2025, 6, 16)),
    ("month", _utc(2025, 12, 1), _utc(2026, 1, 1)),
]


@pytest.mark.parametrize(("period", "start", "end"), BOUNDARIES)
def test_a_new_window_starts_from_zero(
    period: str,
    start: datetime,
    end: datetime,
    fake: FakeProvider,
    client: Any,
    clock: Clock,
) -> None:
    budget = Budget("windowed", max_calls=2, period=period, store=MemoryStore())
    clock.set(start)
    with RunGuard(budgets=[budget]):
        assert calls_until_refused(client) == 2
        clock.set(end - timedelta(seconds=1))  # not a sliding window: still the same one
        assert not try_ask(client)
        clock.set(end)
        assert held(budget) == Amounts()
        assert calls_until_refused(client) == 2
    assert fake.wire_count == 4


# -- alerts ------------------------------------------------------------------------------


def test_an_alert_budget_never_refuses_and_alerts_once_per_window(
    fake: FakeProvider, client: Any, store: MemoryStore, clock: Clock
) -> None:
    alerts: list[Alert] = []
    watch = Budget(
        "watch", max_calls=3, period="minute", action="alert", on_alert=alerts.append, store=store
    )
    with RunGuard(budgets=[watch], name="agent"):
        seen = []
        for _ in range(6):
            ask(client)
            seen.append(len(alerts))
    assert fake.wire_count == 6
    assert seen == [0, 0, 1, 1, 1, 1]
    (alert,) = alerts
    assert alert == Alert(
        source="budget",
        name="watch",
        metric="calls",
        threshold=1.0,
        value=3,
        limit=3,
        run="agent",
        window_start="2025-06-15T12:20:00+00:00",
        window_end="2025-06-15T12:21:00+00:00",
    )

    clock.advance(60)
    with RunGuard(budgets=[watch], name="agent"):
        for _ in range(4):
            ask(client)
    assert fake.wire_count == 10
    assert len(alerts) == 2
    assert alerts[1].value == 3
    assert alerts[1].window_start == "2025-06-15T12:21:00+00:00"


def test_alert_at_on_a_reject_budget_fires_once_per_fraction_per_window(
    fake: FakeProvider, client: Any, store: MemoryStore, clock: Clock
) -> None:
    alerts: list[Alert] = []
    budget = Budget(
        "team",
        max_calls=4,
        period="hour",
        alert_at=[0.75, 0.5],
        on_alert=alerts.append,
        store=store,
    )
    with RunGuard(budgets=[budget], name="a"):
        ask(client)
        ask(client)
    assert [(a.threshold, a.value, a.run) for a in alerts] == [(0.5, 2, "a")]
    with RunGuard(budgets=[budget], name="b"):
        assert calls_until_refused(client) == 2
    # 0.75 crossed once; reaching the limit of a reject budget is a refusal, not an alert
    assert [(a.threshold, a.value, a.run) for a in alerts] == [(0.5, 2, "a"), (0.75, 3, "b")]
    assert {a.source for a in alerts} == {"budget"}

    clock.advance(3600)
    with RunGuard(budgets=[budget]):
        assert calls_until_refused(client) == 4
    assert [a.threshold for a in alerts] == [0.5, 0.75, 0.5, 0.75]
    assert alerts[-1].window_start == "2025-06-15T13:00:00+00:00"
    assert fake.wire_count == 8


def test_an_alert_budget_with_alert_at_fires_each_fraction_and_the_limit(
    fake: FakeProvider, client: Any, store: MemoryStore
) -> None:
    alerts: list[Alert] = []
    budget = Budget(
        "tokens",
        max_output_tokens=4 * REPLY.output_tokens,
        action="alert",
        alert_at=0.5,
        on_alert=alerts.append,
        store=store,
    )
    with RunGuard(budgets=[budget]):
        for _ in range(6):
            ask(client, max_tokens=1000)  # far over the ceiling: an alert budget holds nothing
    assert fake.wire_count == 6
    assert [(a.metric, a.threshold, a.value) for a in alerts] == [
        ("output_tokens", 0.5, 2 * REPLY.output_tokens),
        ("output_tokens", 1.0, 4 * REPLY.output_tokens),
    ]


def test_budget_alerts_are_delivered_outside_the_ledger_lock(
    client: Any, store: MemoryStore
) -> None:
    seen: list[int] = []
    done = threading.Event()

    def on_alert(alert: Alert) -> None:
        seen.append(guard.usage.calls)  # takes the ledger's lock

    guard = RunGuard(
        budgets=[Budget("locks", max_calls=1, action="alert", on_alert=on_alert, store=store)]
    )

    def agent() -> None:
        with guard:
            ask(client)
        done.set()

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    assert done.wait(timeout=10), "the alert was delivered while the ledger's lock was held"
    assert seen == [1]


# -- the layered policy: daily and monthly lines -------------------------------------------
# The policy "alert at $90 a day, refuse at $150 a day, alert at $3,000 a month,
# refuse at $5,000 a month", scaled down 100 times. A call to model "m" costs
# $0.35 (one output token at $350,000 per million, input free, max_tokens=1,
# so its reserved worst case is its real cost); no line is a whole number of
# calls, so no assertion rests on float sums landing exactly on a line.

PRICE = Price(input=0, output=350_000)
CALL_COST = PRICE.output * 1 / 1_000_000
M_REPLY = Reply(input_tokens=25, output_tokens=1)


def layered(store: Store, team: str, alerts: list[Alert]) -> list[Budget]:
    return [
        Budget(f"{team}-daily-alert", max_cost_usd=0.90, action="alert", on_alert=alerts.append,
               store=store),
        Budget(f"{team}-daily", max_cost_usd=1.50, store=store),
        Budget("org-monthly-alert", max_cost_usd=30.0, period="month", action="alert",
               on_alert=alerts.append, store=store),
        Budget("org-monthly", max_cost_usd=50.0, period="month", store=store),
    ]  # fmt: skip


def spend(client: Any, budgets: list[Budget], alerts: list[Alert]) -> tuple[list[int], Any]:
    """Calls to "m" until a budget refuses: (alerts seen after each call sent, the refusal)."""
    seen: list[int] = []
    with RunGuard(budgets=budgets, prices={"m": PRICE}):
        while True:
            try:
                ask(client, model="m", max_tokens=1)
            except BudgetExceeded as refusal:
                return seen, refusal
            seen.append(len(alerts))


def first_call_reaching(line: float) -> int:
    """The number of calls whose cost first reaches ``line`` dollars."""
    return next(n for n in range(1, 10_000) if n * CALL_COST >= line)


def test_layered_daily_lines_alert_then_refuse(store: MemoryStore, clock: Clock) -> None:
    fake = FakeProvider(default=M_REPLY)
    client = fake.openai(max_retries=0)
    alerts: list[Alert] = []
    budgets = layered(store, "support", alerts)
    seen, refusal = spend(client, budgets, alerts)
    sent = fake.wire_count
    assert len(seen) == sent

    # the daily alert arrived with the call that took the day to $0.90 or more
    assert seen.index(1) + 1 == first_call_reaching(0.90)
    (alert,) = alerts
    assert (alert.source, alert.name, alert.metric, alert.threshold, alert.limit) == (
        "budget",
        "support-daily-alert",
        "cost_usd",
        1.0,
        0.90,
    )
    assert alert.value == pytest.approx(first_call_reaching(0.90) * CALL_COST)
    assert alert.window_start == "2025-06-15T00:00:00+00:00"
    # the daily reject refused the first call that would have crossed $1.50
    assert sent * CALL_COST <= 1.50 < (sent + 1) * CALL_COST
    assert refusal.trip.guard == "budget:support-daily"
    assert refusal.trip.details["resets_at"] == "2025-06-16T00:00:00+00:00"
    assert refusal.trip.observed == pytest.approx((sent + 1) * CALL_COST)
    assert held(budgets[1]).cost_usd == pytest.approx(sent * CALL_COST)
    assert held(budgets[3]).cost_usd == pytest.approx(sent * CALL_COST)

    # the next day starts from zero and alerts again
    clock.advance(86400)
    seen, refusal = spend(client, budgets, alerts)
    assert len(seen) == sent
    assert [a.window_start for a in alerts] == [
        "2025-06-15T00:00:00+00:00",
        "2025-06-16T00:00:00+00:00",
    ]


def test_layered_monthly_lines_alert_then_refuse(store: MemoryStore, clock: Clock) -> None:
    # Under a daily refusal at $1.50, one team can spend at most 31 x $1.50 =
    # $46.50 in a month: the monthly lines are org-wide, reached by two teams.
    fake = FakeProvider(default=M_REPLY)
    client = fake.openai(max_retries=0)
    alerts: list[Alert] = []
    teams = [layered(store, team, alerts) for team in ("support", "research")]
    clock.set(_utc(2025, 3, 1, 9))
    refusals = []
    while not any(r.trip.guard == "budget:org-monthly" for r in refusals):
        for budgets in teams:
            refusals.append(spend(client, budgets, alerts)[1])
        clock.advance(86400)
        assert clock.now < _utc(2025, 4, 1).timestamp(), "the monthly line never refused"
    total = fake.wire_count * CALL_COST

    # until then, every refusal was a team's daily line
    assert {r.trip.guard for r in refusals[:-1]} <= {
        "budget:support-daily",
        "budget:research-daily",
    }
    # the monthly alert fired once, with the call that took March to $30 or more
    (monthly,) = [a for a in alerts if a.name == "org-monthly-alert"]
    assert monthly.value == pytest.approx(first_call_reaching(30.0) * CALL_COST)
    assert (monthly.window_start, monthly.window_end) == (
        "2025-03-01T00:00:00+00:00",
        "2025-04-01T00:00:00+00:00",
    )
    # the monthly reject refused the first call that would have crossed $50
    assert total <= 50.0 < total + CALL_COST
    assert refusals[-1].trip.details["resets_at"] == "2025-04-01T00:00:00+00:00"
    assert held(teams[0][3]).cost_usd == pytest.approx(total)
    # each team's daily alert fired at most once a day
    daily = [(a.name, a.window_start) for a in alerts if a.name.endswith("-daily-alert")]
    assert len(set(daily)) == len(daily) >= 2

    # April: a new month admits again, up to the daily line
    clock.set(_utc(2025, 4, 1))
    seen, refusal = spend(client, teams[0], alerts)
    assert refusal.trip.guard == "budget:support-daily"
    assert len(seen) * CALL_COST <= 1.50 < (len(seen) + 1) * CALL_COST


# -- when the store cannot be reached --------------------------------------------------------


def test_a_failing_store_satisfies_the_protocol() -> None:
    assert isinstance(FlakyStore(), Store)


def test_an_unreachable_store_refuses_by_default_without_latching(
    fake: FakeProvider, client: Any
) -> None:
    store = FlakyStore()
    budget = Budget("remote", max_calls=10, store=store)
    with RunGuard(budgets=[budget], name="agent") as guard:
        with pytest.raises(BudgetUnavailable) as info:
            ask(client)
        assert fake.wire_count == 0
        assert not isinstance(info.value, BudgetExceeded)
        assert isinstance(info.value, GuardTripped)
        message = str(info.value)
        assert "flaky://budgets" in message and "'remote'" in message
        assert info.value.trip.guard == "budget:remote"
        assert info.value.trip.details["store"] == "flaky://budgets"
        assert not guard.tripped

        store.failing.clear()  # the store is back: the next call asks it again
        ask(client)
    assert fake.wire_count == 1
    assert held(budget).calls == 1


def test_an_unreachable_store_lets_calls_through_when_allowed(
    fake: FakeProvider, client: Any
) -> None:
    budget = Budget("remote", max_calls=1, store=FlakyStore(), on_store_error="allow")
    with RunGuard(budgets=[budget]) as guard:
        for _ in range(3):  # well past max_calls: nothing is counted while the store is down
            with pytest.warns(RuntimeWarning, match="remote") as caught:
                answer = ask(client)
            assert answer.choices[0].message.content == REPLY.text
            assert any("flaky://budgets" in str(w.message) for w in caught)
    assert fake.wire_count == 3
    assert guard.usage.calls == 3


def test_a_store_failing_at_settle_time_never_raises_into_the_agent(
    fake: FakeProvider, client: Any
) -> None:
    store = FlakyStore(failing=("settle",))
    budget = Budget("remote", max_calls=10, store=store)
    with RunGuard(budgets=[budget]) as guard, pytest.warns(RuntimeWarning, match="remote"):
        answer = ask(client)
    assert answer.choices[0].message.content == REPLY.text
    assert store.attempts == ["reserve", "settle"]
    assert fake.wire_count == 1
    assert guard.usage.calls == 1


def test_the_settle_failure_warning_does_not_misstate_the_policy(
    fake: FakeProvider, client: Any
) -> None:
    # A failure at settle time (after the call was made) is a warning that
    # says what happens to the hold, not one that names the 'allow' policy.
    budget = Budget("remote", max_calls=10, store=FlakyStore(failing=("settle",)))
    with RunGuard(budgets=[budget]), pytest.warns(RuntimeWarning) as caught:
        ask(client)
    assert fake.wire_count == 1
    assert not any("on_store_error='allow'" in str(w.message) for w in caught)


def test_an_unreachable_second_budget_releases_the_first(fake: FakeProvider, client: Any) -> None:
    local = Budget("local", max_output_tokens=100, store=MemoryStore())
    store = FlakyStore()
    remote = Budget("remote", max_calls=10, store=store)
    with RunGuard(budgets=[local, remote]):
        with pytest.raises(BudgetUnavailable):
            ask(client, max_tokens=100)
        assert held(local) == Amounts()
        store.failing.clear()
        ask(client, max_tokens=100)
    assert fake.wire_count == 1


# -- the async client and the anthropic SDK --------------------------------------------------


async def test_async_calls_hold_leases_and_settle(store: MemoryStore) -> None:
    fake = FakeProvider(default=Reply(input_tokens=40, output_tokens=6, delay=0.05))
    aclient = fake.async_openai(max_retries=0)
    budget = Budget("async", max_calls=5, store=store)

    async def one() -> bool:
        try:
            await aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16
            )
        except BudgetExceeded:
            return False
        return True

    with RunGuard(budgets=[budget]) as guard:
        outcomes = await asyncio.gather(*(one() for _ in range(12)))
    assert fake.wire_count == 5
    assert sorted(outcomes) == [False] * 7 + [True] * 5
    assert_held(budget, 5, fake.default)
    assert guard.usage.calls == 5


def test_anthropic_calls_draw_on_the_same_budget(fake: FakeProvider, store: MemoryStore) -> None:
    budget = Budget("mixed", max_output_tokens=300, store=store)
    anthropic_client = fake.anthropic(max_retries=0)
    openai_client = fake.openai(max_retries=0)
    with RunGuard(budgets=[budget]):
        anthropic_client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=200,
            messages=[{"role": "user", "content": "hi"}],
        )
        ask(openai_client, max_tokens=200)  # 6 spent + 200 fits
        with pytest.raises(BudgetExceeded):
            anthropic_client.messages.create(
                model="claude-3-5-haiku-latest",
                max_tokens=300,
                messages=[{"role": "user", "content": "hi"}],
            )
    assert fake.wire_count == 2
    assert held(budget).output_tokens == 2 * REPLY.output_tokens


# -- validation ------------------------------------------------------------------------------

BAD_BUDGETS = [
    ({"name": ""}, ValueError, "name"),
    ({"name": 5}, TypeError, "name"),
    ({"name": "a:b"}, ValueError, "name"),
    ({"max_calls": 0}, ValueError, "max_calls"),
    ({"max_calls": 1.5}, TypeError, "max_calls"),
    ({"max_calls": True}, TypeError, "max_calls"),
    ({"max_input_tokens": -1}, ValueError, "max_input_tokens"),
    ({"max_output_tokens": "10"}, TypeError, "max_output_tokens"),
    ({"max_total_tokens": 0}, ValueError, "max_total_tokens"),
    ({"max_cost_usd": 0}, ValueError, "max_cost_usd"),
    ({"max_cost_usd": float("nan")}, ValueError, "max_cost_usd"),
    ({"max_cost_usd": float("inf")}, ValueError, "max_cost_usd"),
    ({"max_cost_usd": "5"}, TypeError, "max_cost_usd"),
    ({"period": "year"}, ValueError, "period"),
    ({"period": "Day"}, ValueError, "period"),
    ({"action": "warn"}, ValueError, "action"),
    ({"store": object()}, TypeError, "store"),
    ({"store": "memory"}, TypeError, "store"),
    ({"alert_at": 0}, ValueError, "alert_at"),
    ({"alert_at": 1.5}, ValueError, "alert_at"),
    ({"alert_at": "0.5"}, TypeError, "alert_at"),
    ({"alert_at": [0.5, True]}, TypeError, "alert_at"),
    ({"on_alert": 5}, TypeError, "on_alert"),
    ({"on_alert": "ftp://x"}, TypeError, "on_alert"),
    ({"on_store_error": "ignore"}, ValueError, "on_store_error"),
    ({"lease_seconds": 0}, ValueError, "lease_seconds"),
    ({"lease_seconds": -5}, ValueError, "lease_seconds"),
    ({"lease_seconds": "600"}, TypeError, "lease_seconds"),
]


@pytest.mark.parametrize(("change", "error", "field"), BAD_BUDGETS)
def test_bad_budget_settings_raise_naming_the_field(
    change: dict[str, Any], error: type[Exception], field: str
) -> None:
    settings: dict[str, Any] = {"name": "ok", "max_calls": 10, **change}
    name = settings.pop("name")
    with pytest.raises(error, match=field):
        Budget(name, **settings)


def test_a_budget_needs_a_ceiling() -> None:
    with pytest.raises(ValueError, match="max_"):
        Budget("nothing")
    with pytest.raises(ValueError, match="max_"):
        Budget("nothing", period="hour", action="alert")


def test_good_budget_settings_are_kept() -> None:
    store = MemoryStore()
    budget = Budget(
        "ok",
        max_cost_usd=5,
        period="week",
        store=store,
        action="alert",
        alert_at=[0.9, 0.5],
        on_alert="https://example.invalid/hook",
        on_store_error="allow",
        lease_seconds=30,
    )
    assert budget.store is store
    assert budget.alert_at == (0.5, 0.9)
    assert budget.limits == Limits(cost_usd=5)
    assert (budget.period, budget.action, budget.on_store_error) == ("week", "alert", "allow")
    assert budget.lease_seconds == 30
    assert "ok" in repr(budget)


@pytest.mark.parametrize("budgets", ["x", b"x", 5, [object()], [Budget("b", max_calls=1), "c"]])
def test_runguard_rejects_what_is_not_a_budget(budgets: Any) -> None:
    with pytest.raises(TypeError, match="budgets"):
        RunGuard(budgets=budgets)


def test_runguard_lists_its_budgets() -> None:
    one, two = Budget("one", max_calls=1), Budget("two", max_calls=1)
    assert RunGuard(budgets=(b for b in (one, two))).budgets == (one, two)
