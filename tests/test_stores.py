"""Shared-budget stores: the same behaviour from MemoryStore, SQLiteStore and RedisStore.

MemoryStore is the reference; every behaviour test runs against all three.
Then what only a shared store must do: count exactly across threads and
processes, return a crashed process's leases when they lapse, fail fast when
Redis is down, and let Redis forget ended windows by itself.

Times are real epoch seconds (Redis expires keys by its own clock), but the
``now`` each operation gets is the caller's clock, so most tests move time by
passing a later ``now`` instead of sleeping.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runguard.stores import Amounts, Limits, MemoryStore, Store
from runguard.stores.redis import EXPIRY_MARGIN_SECONDS, RedisStore
from runguard.stores.sqlite import SQLiteStore

DAY = 86_400.0
T0 = float(int(time.time()))
END = T0 + DAY  # the window's end, for every test that doesn't move it
LEASE = T0 + 60  # lease expiry, for every test that doesn't move it
ONE_CALL = Amounts(calls=1)
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="fork and SIGKILL")

# How to open a store in another process: ("sqlite", path) or ("redis", url, prefix).
Spec = tuple[str, ...]


def open_store(spec: Spec) -> Store:
    if spec[0] == "sqlite":
        return SQLiteStore(spec[1])
    if spec[0] == "redis":
        return RedisStore(spec[1], prefix=spec[2])
    raise AssertionError(spec)


def unique_prefix() -> str:
    return f"runguard-test:{uuid.uuid4().hex}:"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        sqlite_store = SQLiteStore(tmp_path / "b.db")
        yield sqlite_store
        sqlite_store.close()
    else:
        redis_url = request.getfixturevalue("redis_url")
        redis_store = RedisStore(redis_url, prefix=unique_prefix())
        yield redis_store
        redis_store.close()


@pytest.fixture(params=["sqlite", "redis"])
def shared_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Spec:
    """A store other processes can open too."""
    if request.param == "sqlite":
        return ("sqlite", str(tmp_path / "b.db"))
    return ("redis", request.getfixturevalue("redis_url"), unique_prefix())


def reserve(
    store: Store,
    ask: Amounts = ONE_CALL,
    limits: Limits = Limits(),  # noqa: B008 - an immutable NamedTuple
    *,
    key: str = "k",
    lease_id: str | None = None,
    until: float = LEASE,
    now: float = T0,
    expire_at: float = END,
) -> tuple[bool, Amounts]:
    lease_id = lease_id or uuid.uuid4().hex
    return store.reserve(key, ask, limits, lease_id, until, now, expire_at)


def totals(store: Store, key: str = "k", now: float = T0) -> Amounts:
    """Spent + leased, by a reservation that asks for nothing (and holds nothing)."""
    lease_id = uuid.uuid4().hex
    ok, total = store.reserve(key, Amounts(), Limits(), lease_id, now, now, END)
    assert ok
    store.settle(key, lease_id, Amounts(), END)
    return total


# --- behaviour: the same from every store ---------------------------------------------


def test_reserve_within_limits_returns_totals_before(store: Store) -> None:
    limits = Limits(calls=10, input_tokens=1000, output_tokens=1000, cost_usd=1.0)
    ask = Amounts(1, 100, 50, 0.25)

    assert reserve(store, ask, limits) == (True, Amounts())
    assert reserve(store, ask, limits) == (True, ask)
    assert reserve(store, ask, limits) == (True, ask + ask)


FILL_AND_CROSS = {
    "calls": (Limits(calls=3), Amounts(calls=3), Amounts(calls=1)),
    "input": (Limits(input_tokens=100), Amounts(0, 100), Amounts(0, 1)),
    "output": (Limits(output_tokens=100), Amounts(0, 0, 100), Amounts(0, 0, 1)),
    "total-by-input": (Limits(total_tokens=100), Amounts(0, 60, 40), Amounts(0, 1, 0)),
    "total-by-output": (Limits(total_tokens=100), Amounts(0, 60, 40), Amounts(0, 0, 1)),
    "cost": (Limits(cost_usd=1.0), Amounts(cost_usd=1.0), Amounts(cost_usd=0.01)),
}


@pytest.mark.parametrize("case", FILL_AND_CROSS.values(), ids=FILL_AND_CROSS.keys())
def test_ask_crossing_a_limit_is_refused_and_holds_nothing(
    store: Store, case: tuple[Limits, Amounts, Amounts]
) -> None:
    limits, fill, cross = case
    # reaching a limit exactly is allowed: the ceiling is inclusive
    assert reserve(store, fill, limits) == (True, Amounts())

    assert reserve(store, cross, limits) == (False, fill)
    assert reserve(store, cross, limits) == (False, fill)
    assert totals(store) == fill  # the refused asks left no lease


def test_none_limits_never_refuse(store: Store) -> None:
    huge = Amounts(10**9, 10**12, 10**12, 1e9)
    for _ in range(3):
        assert reserve(store, huge, Limits())[0]
    assert totals(store) == Amounts(3 * 10**9, 3 * 10**12, 3 * 10**12, 3e9)


@pytest.mark.parametrize(
    "actual", [Amounts(1, 10, 20, 0.05), Amounts(3, 500, 900, 2.5)], ids=["smaller", "larger"]
)
def test_settle_replaces_the_lease_with_actual_amounts(store: Store, actual: Amounts) -> None:
    limits = Limits(calls=10)
    assert reserve(store, Amounts(1, 100, 100, 0.5), limits, lease_id="a")[0]
    assert reserve(store, Amounts(1, 100, 100, 0.5), limits, lease_id="b")[0]

    assert store.settle("k", "a", actual, END) == actual
    assert totals(store) == actual + Amounts(1, 100, 100, 0.5)
    assert store.settle("k", "b", actual, END) == actual + actual
    assert totals(store) == actual + actual


def test_settle_of_an_unknown_lease_still_adds_actual(store: Store) -> None:
    # the call happened, whatever became of its lease
    assert store.settle("k", "never-reserved", Amounts(1, 10, 10, 0.1), END) == Amounts(
        1, 10, 10, 0.1
    )
    assert totals(store) == Amounts(1, 10, 10, 0.1)


def test_settle_of_a_lapsed_lease_still_adds_actual(store: Store) -> None:
    assert reserve(store, Amounts(1, 100, 100, 1.0), lease_id="slow", until=T0 + 5)[0]
    assert totals(store, now=T0 + 10) == Amounts()  # lapsed and dropped

    assert store.settle("k", "slow", Amounts(1, 10, 10, 0.1), END) == Amounts(1, 10, 10, 0.1)
    assert totals(store, now=T0 + 10) == Amounts(1, 10, 10, 0.1)


def test_lapsed_leases_stop_counting_at_the_next_reserve(store: Store) -> None:
    limits = Limits(calls=1)
    assert reserve(store, ONE_CALL, limits, until=T0 + 5)[0]

    assert reserve(store, ONE_CALL, limits, now=T0 + 4.999) == (False, ONE_CALL)
    # a lease lapses at its expiry time itself (until <= now)
    assert reserve(store, ONE_CALL, limits, now=T0 + 5, until=T0 + 65) == (True, Amounts())
    assert reserve(store, ONE_CALL, limits, now=T0 + 6) == (False, ONE_CALL)


def test_first_is_true_once_per_key_and_marker(store: Store) -> None:
    assert store.first("k", "80%", END)
    assert not store.first("k", "80%", END)
    assert store.first("k", "100%", END)
    assert store.first("other", "80%", END)
    assert not store.first("other", "80%", END)
    assert not store.first("k", "100%", END)


def test_keys_are_independent(store: Store) -> None:
    limits = Limits(calls=1)
    assert reserve(store, ONE_CALL, limits, key="a")[0]
    assert not reserve(store, ONE_CALL, limits, key="a")[0]

    assert reserve(store, ONE_CALL, limits, key="b") == (True, Amounts())
    store.settle("c", "x", Amounts(5, 5, 5, 5.0), END)
    assert totals(store, key="a") == ONE_CALL
    assert totals(store, key="b") == ONE_CALL


def test_many_small_costs_sum_correctly(store: Store) -> None:
    spent = Amounts()
    for i in range(1000):
        spent = store.settle("k", f"s{i}", Amounts(1, 3, 7, 0.001), END)
    assert spent.calls == 1000
    assert spent.total_tokens == 10_000
    assert spent.cost_usd == pytest.approx(1.0, abs=1e-9)

    for i in range(200):
        assert reserve(store, Amounts(cost_usd=0.0007), lease_id=f"r{i}")[0]
    assert totals(store).cost_usd == pytest.approx(1.14, abs=1e-9)
    # the ceiling is compared with the sum: a millionth of a dollar either side counts
    assert not reserve(store, Amounts(cost_usd=0.860001), Limits(cost_usd=2.0))[0]
    assert reserve(store, Amounts(cost_usd=0.859999), Limits(cost_usd=2.0))[0]
    assert not reserve(store, Amounts(cost_usd=2e-6), Limits(cost_usd=2.0))[0]


def test_a_window_is_forgotten_once_it_has_ended(store: Store) -> None:
    store.settle("k", "x", Amounts(5, 5, 5, 5.0), END)
    assert store.first("k", "alert", END)
    assert reserve(store, ONE_CALL, Limits(calls=5), lease_id="held", until=END + 60)[0] is False

    # the same key after its window ended, e.g. reused by a caller whose clock is ahead
    later = END + 1
    assert reserve(store, ONE_CALL, now=later, expire_at=later + DAY) == (True, Amounts())
    assert store.first("k", "alert", later + DAY)


# --- concurrency: exactly the limit, across threads and processes -------------------------

LIMIT = 100
THREADS = 8
ATTEMPTS = 50


def contend(store: Store, key: str, now: float, tag: str) -> int:
    """THREADS threads try ATTEMPTS reservations each of one call; return how many got one.

    Half of the admitted calls are settled at once, so settles race reservations too
    (a settled call counts as much as a held one).
    """
    accepted = 0
    lock = threading.Lock()
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        nonlocal accepted
        try:
            start.wait()
            for attempt in range(ATTEMPTS):
                lease_id = f"{tag}-{thread}-{attempt}"
                ok, _ = store.reserve(
                    key, ONE_CALL, Limits(calls=LIMIT), lease_id, now + 600, now, now + DAY
                )
                if ok:
                    with lock:
                        accepted += 1
                    if attempt % 2:
                        store.settle(key, lease_id, ONE_CALL, now + DAY)
        except BaseException as e:
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return accepted


def test_threads_sharing_one_store_get_exactly_the_limit(store: Store) -> None:
    assert contend(store, "k", T0, "t") == LIMIT
    assert totals(store).calls == LIMIT


def contend_in_process(spec: Spec, key: str, now: float, start: Any, results: Any) -> None:
    """A spawned process: open the store, wait for the others, contend, report."""
    try:
        store = open_store(spec)
        start.wait()
        results.put(("ok", contend(store, key, now, f"p{os.getpid()}")))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def test_processes_sharing_a_store_get_exactly_the_limit(shared_spec: Spec) -> None:
    processes = 4
    store = open_store(shared_spec)
    totals(store)  # creates the SQLite file before the processes race to
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    workers = [
        ctx.Process(target=contend_in_process, args=(shared_spec, "k", T0, start, results))
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=10)

    assert [error for status, error in reports if status != "ok"] == []
    counts = [count for _, count in reports]
    assert sum(counts) == LIMIT, counts
    assert totals(store).calls == LIMIT


def reserve_in_fork(store: Store, results: Any) -> None:
    results.put(reserve(store, ONE_CALL, Limits(calls=3)))


@posix_only
def test_a_store_keeps_working_in_a_forked_child(shared_spec: Spec) -> None:
    store = open_store(shared_spec)
    assert reserve(store, ONE_CALL, Limits(calls=3))[0]  # connected before the fork

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=reserve_in_fork, args=(store, results))
    child.start()
    assert results.get(timeout=30) == (True, ONE_CALL)
    child.join(timeout=10)

    assert reserve(store, ONE_CALL, Limits(calls=3)) == (True, ONE_CALL + ONE_CALL)
    assert reserve(store, ONE_CALL, Limits(calls=3))[0] is False


# --- crash safety: a killed process's leases lapse -----------------------------------------

BUDGET = Limits(calls=10)
WHOLE_BUDGET = Amounts(calls=10)


def reserve_and_hang(spec: Spec, results: Any) -> None:
    """A spawned process that takes the whole budget in leases, then never settles."""
    store = open_store(spec)
    now = time.time()
    until = now + 2
    for i in range(10):
        ok, _ = store.reserve("k", ONE_CALL, BUDGET, f"doomed-{i}", until, now, now + DAY)
        assert ok
    results.put(until)
    time.sleep(60)


@posix_only
def test_leases_of_a_killed_process_lapse(shared_spec: Spec) -> None:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    doomed = ctx.Process(target=reserve_and_hang, args=(shared_spec, results))
    doomed.start()
    until = results.get(timeout=60)
    assert doomed.pid is not None
    os.kill(doomed.pid, signal.SIGKILL)
    doomed.join(timeout=10)
    store = open_store(shared_spec)

    # its leases still hold the budget...
    assert reserve(store, WHOLE_BUDGET, BUDGET, now=time.time()) == (False, WHOLE_BUDGET)
    assert not reserve(store, ONE_CALL, BUDGET, now=time.time())[0]
    # ...until they lapse: by a clock passed explicitly,
    later = until + 1
    assert reserve(store, WHOLE_BUDGET, BUDGET, lease_id="probe", now=later, until=later) == (
        True,
        Amounts(),
    )
    store.settle("k", "probe", Amounts(), END)  # the probe's call never happened
    # and by the real one
    time.sleep(max(0.0, until - time.time()) + 0.05)
    assert reserve(store, WHOLE_BUDGET, BUDGET, now=time.time()) == (True, Amounts())


# --- Redis: failures, expiry, names -----------------------------------------------------


def run_with_deadline(action: Callable[[], object], seconds: float = 10.0) -> BaseException | None:
    """Run ``action`` in a thread; return what it raised (None if nothing), or fail if it hangs."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            action()
        except BaseException as e:
            raised.append(e)
        else:
            raised.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the store hung instead of failing"
    return raised[0]


def test_redis_down_raises_instead_of_hanging(redis_server: Any) -> None:
    import redis

    store = RedisStore(redis_server.url, prefix=unique_prefix())
    assert reserve(store, ONE_CALL, Limits(calls=5))[0]

    redis_server.stop()
    for operation in (
        lambda: reserve(store, ONE_CALL, Limits(calls=5)),
        lambda: store.settle("k", "x", ONE_CALL, END),
        lambda: store.first("k", "m", END),
    ):
        error = run_with_deadline(operation)
        assert isinstance(error, redis.ConnectionError), repr(error)

    # back again (empty: the test server keeps nothing on disk), and the store reconnects
    redis_server.start()
    assert reserve(store, ONE_CALL, Limits(calls=5)) == (True, Amounts())
    store.close()


def test_redis_unreachable_from_the_start_raises(redis_server: Any) -> None:
    import redis

    redis_server.stop()
    store = RedisStore(redis_server.url)
    error = run_with_deadline(lambda: reserve(store, ONE_CALL))
    assert isinstance(error, redis.ConnectionError), repr(error)


def test_redis_keys_expire_after_the_window(redis_url: str) -> None:
    import redis

    prefix = unique_prefix()
    store = RedisStore(redis_url, prefix=prefix)
    assert reserve(store, ONE_CALL, lease_id="held")[0]
    store.settle("k", "done", ONE_CALL, END)
    store.first("k", "alert", END)

    raw = redis.Redis.from_url(redis_url)
    longest = END + EXPIRY_MARGIN_SECONDS - time.time() + 1
    for suffix in ("spent", "leases", "markers"):
        ttl = raw.ttl(f"{prefix}k:{suffix}")
        assert 0 < ttl <= longest, (suffix, ttl)
    raw.close()
    store.close()


def test_redis_store_with_a_client_of_its_own(redis_url: str) -> None:
    import redis

    # replies come as str, not bytes, from this client
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(redis_url, prefix=unique_prefix(), client=client)
    assert reserve(store, Amounts(1, 2, 3, 0.5), lease_id="a")[0]
    assert store.settle("k", "a", Amounts(1, 2, 3, 0.25), END) == Amounts(1, 2, 3, 0.25)
    assert store.first("k", "m", END)
    store.close()
    assert client.ping()  # a client passed in is the caller's to close
    client.close()


def test_redis_name_leaves_out_the_password() -> None:
    assert RedisStore("redis://127.0.0.1:6379/0").name == "redis://127.0.0.1:6379/0"
    assert RedisStore("redis://:s3cret@cache:6380/2").name == "redis://cache:6380/2"
    assert RedisStore("rediss://app:s3cret@cache/0").name == "rediss://app@cache/0"


def test_redis_store_without_the_redis_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis now fails
    with pytest.raises(ImportError, match=r"pip install agent-runguard\[redis\]"):
        RedisStore()


# --- SQLite specifics ----------------------------------------------------------------------


def test_sqlite_deletes_ended_windows_of_other_keys(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "b.db")
    store.settle("old", "x", ONE_CALL, T0 + 10)
    store.first("old", "alert", T0 + 10)
    assert reserve(store, key="old", until=T0 + 5, expire_at=T0 + 10)[0]
    store.close()

    # a store object sweeps at its first reservation, then now and then
    store = SQLiteStore(tmp_path / "b.db")
    assert reserve(store, key="new", now=T0 + 11)[0]
    db = sqlite3.connect(tmp_path / "b.db")
    assert db.execute("SELECT key FROM spent").fetchall() == [("new",)]
    assert db.execute("SELECT key FROM leases").fetchall() == [("new",)]
    assert db.execute("SELECT key FROM markers").fetchall() == []
    db.close()
    store.close()


def test_sqlite_store_needs_a_file() -> None:
    with pytest.raises(ValueError, match="file"):
        SQLiteStore(":memory:")
