"""Shared budgets end to end: many processes, one Redis or SQLite budget, real SDK clients.

Ground truth is what reached the fake provider's wire. Every worker process
(``shared_budget_worker``, started with the "spawn" method so that each one
imports runguard afresh) has its own :class:`FakeProvider`, so the total sent
is the sum of the wire counts the workers report back. What a budget holds is
read back from its store through the store protocol itself (a zero-sized
reservation), never from private attributes. No assertion rests on how long
anything took: waits are polls with a generous deadline.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import genai_prices
import pytest

import runguard.budgets
import shared_budget_worker as worker
from runguard import (
    Budget,
    BudgetExceeded,
    BudgetUnavailable,
    GuardTripped,
    RunGuard,
)
from runguard.stores import Amounts, Limits
from runguard.testing import FakeProvider, Reply
from shared_budget_worker import FLEET_REPLY, MODEL, Spec, open_store

REPLY = Reply(input_tokens=40, output_tokens=6)


# -- helpers ---------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def shared_spec(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Spec:
    """A store other processes can open too: a fresh SQLite file, or a fresh Redis prefix."""
    if kind == "sqlite":
        return ("sqlite", str(tmp_path / "budget.db"))
    return ("redis", request.getfixturevalue("redis_url"), f"runguard-e2e:{uuid.uuid4().hex}:")


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


def catalogue_price(input_tokens: int, output_tokens: int) -> float:
    """What genai-prices itself charges for one call to MODEL (the reference for cost_usd)."""
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return float(genai_prices.calc_price(usage, MODEL, provider_id="openai").total_price)


def ask(client: Any) -> Any:
    return worker.ask(client)


def try_ask(client: Any) -> bool:
    """One call; True if it was sent, False if a budget refused it."""
    try:
        ask(client)
    except BudgetExceeded:
        return False
    return True


def calls_until_refused(client: Any, limit: int = 1000) -> int:
    for n in range(limit):
        if not try_ask(client):
            return n
    raise AssertionError(f"no call was refused in {limit} tries")


def run_fleet(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run one spawned ``worker.fleet`` per job, all starting together; their reports."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(len(jobs)), ctx.Queue()
    processes = [
        ctx.Process(target=worker.fleet, args=(job, start, results), daemon=True) for job in jobs
    ]
    for process in processes:
        process.start()
    try:
        reports = [results.get(timeout=90) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
    assert [detail for status, detail in reports if status != "ok"] == []
    return [detail for _, detail in reports]


# -- 1 and 2: 4 processes x 8 threads, one budget of 100 calls --------------------------

PROCESSES = 4
THREADS = 8
FLEET_LIMIT = 100
#: per thread, under the "keep" policy: 4 x 8 x 5 = 160 tries against 100 calls
ATTEMPTS = 5

POLICIES = {
    # each thread stops at its first refusal; the RunGuard covers them by propagate()
    "stop-propagated": ("stop", "context"),
    # each thread keeps calling after refusals; a process-scoped RunGuard covers them
    "keep-calling-process-scope": ("keep", "process"),
}


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("kind", ["redis", "sqlite"])
def test_a_fleet_of_processes_sends_exactly_the_budget(
    kind: str, policy: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spec = shared_spec(kind, request, tmp_path)
    name = unique("fleet")
    parent_view = Budget(name, max_calls=FLEET_LIMIT, store=open_store(spec))
    assert held(parent_view) == Amounts()  # a fresh budget (and, for SQLite, a created file)

    how, scope = policy
    reports = run_fleet(
        [
            {
                "spec": spec,
                "budgets": [{"name": name, "max_calls": FLEET_LIMIT}],
                "threads": THREADS,
                "policy": how,
                "attempts": ATTEMPTS,
                "scope": scope,
                "tag": f"p{i}",
            }
            for i in range(PROCESSES)
        ]
    )

    wires = [r["wire"] for r in reports]
    assert sum(wires) == FLEET_LIMIT, wires
    for report in reports:
        # each process's own view agrees with its wire: no call sent uncounted
        assert report["sent"] == report["wire"] == report["guard_calls"], report
        assert report["refusals"] in ([], [f"budget:{name}"]), report
    refused = sum(r["refused"] for r in reports)
    if how == "stop":
        assert refused == PROCESSES * THREADS  # every thread ended on a refusal
    else:
        assert refused == PROCESSES * THREADS * ATTEMPTS - FLEET_LIMIT
    # the store agrees: 100 calls spent, with the usage the fake reported, and no lease
    # left over (a leftover lease would hold its 16 reserved output tokens)
    assert held(parent_view) == (
        FLEET_LIMIT,
        FLEET_LIMIT * FLEET_REPLY.input_tokens,
        FLEET_LIMIT * FLEET_REPLY.output_tokens,
        pytest.approx(
            FLEET_LIMIT * catalogue_price(FLEET_REPLY.input_tokens, FLEET_REPLY.output_tokens)
        ),
    )
    # and refuses the parent too, sending nothing
    fake = FakeProvider(default=REPLY)
    with RunGuard(budgets=[parent_view]):
        assert not try_ask(fake.openai(max_retries=0))
    assert fake.wire_count == 0


# -- 3: a process killed while holding reservations --------------------------------------

LEASE_SECONDS = 2.0
CRASH_LIMIT = 10
LAPSE_DEADLINE = 10.0


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_killed_process_gives_the_budget_back_within_the_lease(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spec = shared_spec(kind, request, tmp_path)
    name = unique("crash")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    doomed = ctx.Process(
        target=worker.hold_and_hang,
        args=(spec, name, CRASH_LIMIT, LEASE_SECONDS, results),
        daemon=True,
    )
    doomed.start()
    try:
        status, detail = results.get(timeout=90)
        assert status == "ready", detail
        assert detail == CRASH_LIMIT  # all ten reached the doomed process's wire
        assert doomed.pid is not None
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.join(timeout=10)
    finally:
        if doomed.is_alive():
            doomed.kill()
            doomed.join()
    assert doomed.exitcode == -signal.SIGKILL

    fake = FakeProvider(default=REPLY)
    client = fake.openai(max_retries=0)
    budget = Budget(
        name, max_calls=CRASH_LIMIT, lease_seconds=LEASE_SECONDS, store=open_store(spec)
    )
    with RunGuard(budgets=[budget]) as guard:
        # right after the kill, the dead process's ten leases still hold the budget
        with pytest.raises(BudgetExceeded) as info:
            ask(client)
        assert fake.wire_count == 0
        assert info.value.trip.guard == f"budget:{name}"
        assert info.value.trip.observed == CRASH_LIMIT + 1

        # within the lease they lapse, and a call goes through
        deadline = time.monotonic() + LAPSE_DEADLINE
        while not try_ask(client):
            assert fake.wire_count == 0
            assert time.monotonic() < deadline, "the killed process's leases never lapsed"
            time.sleep(0.2)
        assert fake.wire_count == 1

        # the budget is whole again: nine more fit, the eleventh call is refused
        assert calls_until_refused(client) == CRASH_LIMIT - 1
        assert not guard.tripped
    assert fake.wire_count == CRASH_LIMIT
    assert guard.usage.calls == CRASH_LIMIT
    # the dead calls were never charged: the window holds just the parent's ten
    assert held(budget).calls == CRASH_LIMIT


# -- 4: Redis stopped mid-run ---------------------------------------------------------------


def assert_unavailable(info: pytest.ExceptionInfo[BudgetUnavailable], name: str, url: str) -> None:
    error = info.value
    assert isinstance(error, GuardTripped)
    assert not isinstance(error, BudgetExceeded)
    # as printed: a "429" in the URL (its random port, say) is split by an invisible
    # word joiner so that no harness retries the refusal (see runguard._errors)
    message = str(error).replace("\u2060", "").replace("\u00a0", " ")
    assert url in message, message
    assert repr(name) in message, message
    assert error.trip.guard == f"budget:{name}"
    assert error.trip.details["store"] == url


def test_redis_stopped_mid_run_refuses_every_call_until_it_is_back(redis_server: Any) -> None:
    from runguard.stores.redis import RedisStore

    fake = FakeProvider(default=REPLY)
    client = fake.openai(max_retries=0)
    name = unique("remote")
    store = RedisStore(redis_server.url, prefix=unique("e2e") + ":")
    budget = Budget(name, max_calls=100, store=store)
    with RunGuard(budgets=[budget], name="agent") as guard:
        for _ in range(3):
            ask(client)
        assert held(budget).calls == 3

        redis_server.stop()
        for _ in range(3):
            with pytest.raises(BudgetUnavailable) as info:
                ask(client)
            assert_unavailable(info, name, redis_server.url)
            assert info.value.trip.run == "agent"
        assert fake.wire_count == 3  # nothing was sent while the store was down
        assert not guard.tripped  # the refusals did not latch the RunGuard

        redis_server.start()  # back, and empty: the test server keeps nothing on disk
        ask(client)
        ask(client)
    assert fake.wire_count == 5
    assert guard.usage.calls == 5
    assert guard.trip is None
    assert held(budget).calls == 2  # counted again since the restart
    store.close()


def test_redis_stopped_mid_run_sends_with_a_warning_when_fail_open(redis_server: Any) -> None:
    from runguard.stores.redis import RedisStore

    fake = FakeProvider(default=REPLY)
    client = fake.openai(max_retries=0)
    name = unique("open")
    store = RedisStore(redis_server.url, prefix=unique("e2e") + ":")
    budget = Budget(name, max_calls=2, store=store, on_store_error="allow")
    with RunGuard(budgets=[budget]) as guard:
        ask(client)
        redis_server.stop()
        for _ in range(3):  # past max_calls: nothing can be counted while the store is down
            with pytest.warns(RuntimeWarning, match=repr(name)) as caught:
                answer = ask(client)
            assert answer.choices[0].message.content == REPLY.text
            assert any(redis_server.url in str(w.message) for w in caught)
        assert fake.wire_count == 4

        redis_server.start()
        ask(client)
        ask(client)  # the restarted (empty) store counts again, up to its ceiling
        assert not try_ask(client)
    assert fake.wire_count == 6
    assert guard.usage.calls == 6
    assert held(budget).calls == 2
    store.close()


def test_a_call_in_flight_when_redis_stops_returns_its_answer(redis_server: Any) -> None:
    """Admitted while Redis was up, answered after it stopped: the answer reaches the agent
    (the settle failure is a warning), and the next call is refused."""
    from runguard.stores.redis import RedisStore

    answered = threading.Event()

    def after_the_stop(wire: Any) -> Reply:
        assert answered.wait(timeout=30), "the server was never stopped"
        return REPLY

    fake = FakeProvider(responder=after_the_stop)
    client = fake.openai(max_retries=0)
    name = unique("in-flight")
    store = RedisStore(redis_server.url, prefix=unique("e2e") + ":")
    budget = Budget(name, max_calls=100, store=store)

    def stop_once_sent() -> None:
        deadline = time.monotonic() + 30
        while fake.wire_count == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        redis_server.stop()
        answered.set()

    stopper = threading.Thread(target=stop_once_sent, daemon=True)
    with RunGuard(budgets=[budget]) as guard:
        stopper.start()
        with pytest.warns(RuntimeWarning, match=repr(name)) as caught:
            answer = ask(client)
        stopper.join(timeout=30)
        assert answer.choices[0].message.content == REPLY.text
        assert any("not counted" in str(w.message) for w in caught)
        with pytest.raises(BudgetUnavailable):
            ask(client)
        assert not guard.tripped
    assert fake.wire_count == 1
    assert guard.usage.calls == 1
    store.close()


def test_an_alert_budget_on_a_stopped_redis_never_refuses(redis_server: Any) -> None:
    """An alert budget holds nothing before a call and never refuses, so an outage of its
    store cannot stop calls even under the default on_store_error="reject": the call is
    sent and the count it could not record is a warning."""
    from runguard.stores.redis import RedisStore

    fake = FakeProvider(default=REPLY)
    client = fake.openai(max_retries=0)
    alerts: list[Any] = []
    store = RedisStore(redis_server.url, prefix=unique("e2e") + ":")
    watch = Budget(
        unique("watch"), max_calls=1, action="alert", on_alert=alerts.append, store=store
    )
    assert watch.on_store_error == "reject"
    redis_server.stop()
    with RunGuard(budgets=[watch]), pytest.warns(RuntimeWarning, match="not counted"):
        ask(client)
    assert fake.wire_count == 1
    assert alerts == []  # the line was never seen crossed: nothing could be counted
    store.close()


def test_a_redis_password_stays_out_of_the_refusal(redis_server: Any) -> None:
    from runguard.stores.redis import RedisStore

    fake = FakeProvider(default=REPLY)
    client = fake.openai(max_retries=0)
    redis_server.stop()
    secret_url = redis_server.url.replace("redis://", "redis://agent:s3cr3t-pw@")
    budget = Budget(unique("locked"), max_calls=5, store=RedisStore(secret_url))
    with RunGuard(budgets=[budget]), pytest.raises(BudgetUnavailable) as info:
        ask(client)
    assert fake.wire_count == 0
    shown = f"{info.value} {info.value.trip!r}"
    assert "s3cr3t-pw" not in shown
    assert "agent@127.0.0.1" in str(info.value)


def test_redis_stopped_mid_run_fails_closed_and_open_side_by_side(redis_server: Any) -> None:
    """A RunGuard listing a fail-open and a fail-closed budget: closed wins, nothing is sent."""
    from runguard.stores.redis import RedisStore

    fake = FakeProvider(default=REPLY)
    client = fake.openai(max_retries=0)
    store = RedisStore(redis_server.url, prefix=unique("e2e") + ":")
    lenient = Budget(unique("lenient"), max_calls=50, store=store, on_store_error="allow")
    strict = Budget(unique("strict"), max_calls=50, store=store)
    with RunGuard(budgets=[lenient, strict]):
        ask(client)
        redis_server.stop()
        with (
            pytest.warns(RuntimeWarning, match=repr(lenient.name)),
            pytest.raises(BudgetUnavailable) as info,
        ):
            ask(client)
        assert_unavailable(info, strict.name, redis_server.url)
        assert fake.wire_count == 1
        redis_server.start()
        ask(client)
    assert fake.wire_count == 2
    assert held(lenient).calls == held(strict).calls == 1
    store.close()


async def test_redis_stopped_mid_run_with_the_async_client(redis_server: Any) -> None:
    from runguard.stores.redis import RedisStore

    fake = FakeProvider(default=REPLY)
    aclient = fake.async_openai(max_retries=0)
    store = RedisStore(redis_server.url, prefix=unique("e2e") + ":")
    closed = Budget(unique("async-closed"), max_calls=100, store=store)
    opened = Budget(unique("async-open"), max_calls=100, store=store, on_store_error="allow")

    async def aask() -> Any:
        return await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16
        )

    async with RunGuard(budgets=[closed]) as closed_guard:
        await aask()
        redis_server.stop()
        with pytest.raises(BudgetUnavailable) as info:
            await aask()
        assert_unavailable(info, closed.name, redis_server.url)
        assert fake.wire_count == 1
        assert not closed_guard.tripped

        async with RunGuard(budgets=[opened]) as open_guard:
            # the outer fail-closed budget still covers this call: refused
            with (
                pytest.warns(RuntimeWarning, match=repr(opened.name)),
                pytest.raises(BudgetUnavailable),
            ):
                await aask()
        assert fake.wire_count == 1
        assert open_guard.usage.calls == 0

    async with RunGuard(budgets=[opened]) as open_guard:
        with pytest.warns(RuntimeWarning, match=repr(opened.name)):
            await aask()
        assert fake.wire_count == 2
        redis_server.start()
        await aask()
    assert fake.wire_count == 3
    assert open_guard.usage.calls == 2
    assert held(opened).calls == 1

    async with RunGuard(budgets=[closed]):
        await aask()  # admitted again once the store is back
    assert fake.wire_count == 4
    assert held(closed).calls == 1
    store.close()


# -- 5: layered budgets across processes ------------------------------------------------------

DAILY_LIMIT = 30
MONTHLY_LIMIT = 40
TEAM_THREADS = 4


def test_two_teams_daily_budgets_under_one_monthly_budget(redis_url: str) -> None:
    """Each process (team) has its own daily budget of 30 calls; both share a month of 40."""
    spec = ("redis", redis_url, f"runguard-e2e:{uuid.uuid4().hex}:")
    monthly = unique("org-monthly")
    teams = ["team-a", "team-b"]
    dailies = {team: unique(f"{team}-daily") for team in teams}
    reports = run_fleet(
        [
            {
                "spec": spec,
                "budgets": [
                    {"name": dailies[team], "max_calls": DAILY_LIMIT},
                    {"name": monthly, "max_calls": MONTHLY_LIMIT, "period": "month"},
                ],
                "threads": TEAM_THREADS,
                "policy": "stop",
                "scope": "context",
                "tag": team,
            }
            for team in teams
        ]
    )

    wires = {r["tag"]: r["wire"] for r in reports}
    assert sum(wires.values()) == MONTHLY_LIMIT, wires
    store = open_store(spec)
    for report in reports:
        team = report["tag"]
        assert report["sent"] == report["wire"] <= DAILY_LIMIT, report
        assert set(report["refusals"]) <= {f"budget:{dailies[team]}", f"budget:{monthly}"}
        if f"budget:{dailies[team]}" in report["refusals"]:
            # A team refused by its day used all of it, unless some of the day was held by
            # calls in flight that the month then refused: they gave their holds back.
            assert report["wire"] == DAILY_LIMIT or f"budget:{monthly}" in report["refusals"]
            assert report["wire"] >= DAILY_LIMIT - (TEAM_THREADS - 1), report
        assert (
            held(Budget(dailies[team], max_calls=DAILY_LIMIT, store=store)).calls
            == (report["wire"])
        )
    # 2 x 30 is more than 40: the month is what stopped the fleet
    assert any(f"budget:{monthly}" in r["refusals"] for r in reports), reports
    month = Budget(monthly, max_calls=MONTHLY_LIMIT, period="month", store=store)
    assert held(month).calls == MONTHLY_LIMIT


# -- 6: an alert fires once per window across processes ---------------------------------------

ALERT_LIMIT = 10
ALERT_CALLS = [7, 7, 6]  # 20 calls in all, by 3 processes


def test_an_alert_budget_fires_once_across_processes(redis_url: str) -> None:
    spec = ("redis", redis_url, f"runguard-e2e:{uuid.uuid4().hex}:")
    name = unique("watch")
    settings = {"name": name, "max_calls": ALERT_LIMIT, "action": "alert"}
    reports = run_fleet(
        [
            {
                "spec": spec,
                "budgets": [settings],
                "threads": 1,
                "policy": "keep",
                "attempts": calls,
                "scope": "context",
                "tag": f"p{i}",
            }
            for i, calls in enumerate(ALERT_CALLS)
        ]
    )

    # an alert budget never refuses
    assert sum(r["wire"] for r in reports) == sum(ALERT_CALLS)
    assert all(r["refused"] == 0 for r in reports)
    alerts = [(r["tag"], alert) for r in reports for alert in r["alerts"]]
    assert len(alerts) == 1, alerts
    tag, alert = alerts[0]
    assert (alert["source"], alert["name"], alert["metric"]) == ("budget", name, "calls")
    assert (alert["threshold"], alert["value"], alert["limit"]) == (1.0, ALERT_LIMIT, ALERT_LIMIT)
    assert alert["run"] == tag

    # the store has recorded that the threshold fired in this window: a later
    # claim of the same marker is refused, so no other process can fire it again
    budget = Budget(**settings, store=open_store(spec))  # type: ignore[arg-type]
    assert held(budget).calls == sum(ALERT_CALLS)
    now = time.time()
    start, end = budget.window(now)
    ((marker, _),) = budget.crossed(
        Amounts(calls=ALERT_LIMIT - 1), Amounts(calls=ALERT_LIMIT), start, end, None
    )
    assert budget.store.first(budget.key(start), marker, end.timestamp()) is False
