"""Worker processes for ``test_shared_budgets.py``, started with the "spawn" method.

Each worker imports runguard afresh and has its own :class:`FakeProvider`, so
what reached *its* wire is its own ``fake.wire_count``; it reports that, with
what its threads saw, on a multiprocessing queue. A worker never raises: a
failure is reported as ``("error", traceback)`` so that the test fails with
the child's own traceback instead of waiting for a report that never comes.

This module is not a test module (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Any

from runguard import Alert, Budget, BudgetExceeded, RunGuard, propagate
from runguard.stores import Store
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o-mini"
#: the usage every fleet call reports; the parent checks the store's totals against it
FLEET_REPLY = Reply(input_tokens=40, output_tokens=6, delay=0.005)
#: how long a worker waits for its peers or its own threads before reporting an error
WAIT_SECONDS = 60.0

# How to open a store in another process: ("sqlite", path) or ("redis", url, prefix).
Spec = tuple[str, ...]


def open_store(spec: Spec) -> Store:
    if spec[0] == "sqlite":
        from runguard.stores.sqlite import SQLiteStore

        return SQLiteStore(spec[1])
    if spec[0] == "redis":
        from runguard.stores.redis import RedisStore

        return RedisStore(spec[1], prefix=spec[2])
    raise AssertionError(spec)


def ask(client: Any, max_tokens: int = 16) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
    )


def fleet(job: dict[str, Any], start: Any, results: Any) -> None:
    """Threads making calls under the job's budgets, all drawn from one shared store.

    ``job``:
        spec: the store (see :func:`open_store`).
        budgets: keyword arguments of each :class:`Budget` (the store is added here;
            a budget with ``action="alert"`` delivers to this process's list of alerts).
        threads: how many threads make calls.
        policy: ``"stop"``: each thread calls until its first refusal;
            ``"keep"``: each thread makes ``attempts`` calls, counting refusals.
        attempts: per thread, for "keep".
        scope: ``"context"`` (the threads run ``runguard.propagate``-d work) or
            ``"process"`` (a process-scoped RunGuard covers the plain threads).

    Reports ``("ok", {...})`` once every thread is done: the fake's wire count,
    the calls the threads saw sent and refused, the guard of each refusal, the
    RunGuard's own call count, and the alerts delivered here (as dicts).
    """
    try:
        fake = FakeProvider(default=FLEET_REPLY)
        client = fake.openai(max_retries=0)
        store = open_store(job["spec"])
        alerts: list[Alert] = []
        budgets = [
            Budget(
                **settings,
                store=store,
                **({"on_alert": alerts.append} if settings.get("action") == "alert" else {}),
            )
            for settings in job["budgets"]
        ]
        threads, policy, attempts = job["threads"], job["policy"], job.get("attempts", 0)
        sent = [0] * threads
        refused = [0] * threads
        refusals: list[str] = []
        failures: list[str] = []
        together = threading.Barrier(threads)

        def work(index: int) -> None:
            try:
                together.wait(timeout=WAIT_SECONDS)
                tries = 0
                while policy == "stop" or tries < attempts:
                    tries += 1
                    if policy == "stop" and tries > 1000:
                        raise AssertionError("no refusal in 1000 calls")
                    try:
                        ask(client)
                    except BudgetExceeded as refusal:
                        refused[index] += 1
                        refusals.append(refusal.trip.guard)
                        if policy == "stop":
                            return
                    else:
                        sent[index] += 1
            except BaseException:
                failures.append(traceback.format_exc())

        scope = job["scope"]
        with RunGuard(budgets=budgets, scope=scope, name=job.get("tag")) as guard:
            target = propagate(work) if scope == "context" else work
            workers = [threading.Thread(target=target, args=(i,)) for i in range(threads)]
            start.wait(timeout=WAIT_SECONDS)  # every process is ready: go together
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        if failures:
            results.put(("error", "\n".join(failures)))
            return
        results.put(
            (
                "ok",
                {
                    "tag": job.get("tag"),
                    "wire": fake.wire_count,
                    "sent": sum(sent),
                    "refused": sum(refused),
                    "refusals": sorted(set(refusals)),
                    "guard_calls": guard.usage.calls,
                    "alerts": [alert.to_dict() for alert in alerts],
                },
            )
        )
    except BaseException:
        results.put(("error", traceback.format_exc()))


def hold_and_hang(spec: Spec, name: str, calls: int, lease_seconds: float, results: Any) -> None:
    """Start ``calls`` concurrent calls whose answers take 30 s, so each holds a lease;
    report ``("ready", wire count)`` once all of them reached the fake's wire, then
    wait to be killed."""
    try:
        fake = FakeProvider(default=Reply(delay=30))
        client = fake.openai(max_retries=0)
        budget = Budget(name, max_calls=calls, lease_seconds=lease_seconds, store=open_store(spec))
        failures: list[str] = []

        def work() -> None:
            try:
                ask(client)
            except BaseException:
                failures.append(traceback.format_exc())

        with RunGuard(budgets=[budget]):
            for _ in range(calls):
                threading.Thread(target=propagate(work), daemon=True).start()
            deadline = time.monotonic() + WAIT_SECONDS
            while fake.wire_count < calls:
                if failures:
                    results.put(("error", "\n".join(failures)))
                    return
                if time.monotonic() > deadline:
                    results.put(("error", f"only {fake.wire_count} of {calls} calls were sent"))
                    return
                time.sleep(0.005)
            results.put(("ready", fake.wire_count))
            time.sleep(WAIT_SECONDS)  # the parent SIGKILLs this process long before
    except BaseException:
        results.put(("error", traceback.format_exc()))
