"""Exactly ``max_calls`` calls reach the wire, however many threads or tasks race for them.

Run ``python benchmarks/concurrency.py`` (``--quick`` makes fewer attempts).

64 threads under ``RunGuard(max_calls=100, scope="process")``, then 64 asyncio
tasks under ``RunGuard(max_calls=100)`` (context scope: tasks inherit the guard
of the task that creates them), share one openai client each. The fake provider
answers every call after a short delay, so dozens of calls are in flight when
the ceiling is reached. Two agent policies:

* stop: a worker stops at its first refusal;
* retry: a worker ignores refusals and keeps calling until it has made all its
  attempts (a careless agent, or a framework that swallows exceptions).

FakeProvider counts the HTTP requests that reach it, SDK retries included. With
a pre-call admission under one lock that count is exactly 100 in every case, and
equals the guard's ``usage.calls``. The script exits 1 if it is not.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from typing import Any, NamedTuple

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

LIMIT = 100
WORKERS = 64
DELAY = 0.005  # seconds the fake takes to answer
MESSAGES = [{"role": "user", "content": "Look up order ORD-1042."}]


class Result(NamedTuple):
    workers: str
    policy: str
    attempts: int
    refused: int
    wire: int
    calls: int
    seconds: float


def ask(client: Any) -> Any:
    return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=50)


def with_threads(policy: str, attempts: int) -> Result:
    fake = FakeProvider(default=Reply(delay=DELAY))
    client = fake.openai()
    start = threading.Barrier(WORKERS)
    tried: list[int] = []  # list.append is atomic: no lock needed
    refused: list[int] = []

    def worker() -> None:
        start.wait()
        for _ in range(attempts):
            tried.append(1)
            try:
                ask(client)
            except BudgetExceeded:
                refused.append(1)
                if policy == "stop":
                    return

    began = time.perf_counter()
    # Threads don't inherit context variables: scope="process" covers them all.
    with RunGuard(max_calls=LIMIT, scope="process", raise_on_exit=False) as guard:
        threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = time.perf_counter() - began
    return Result(
        f"{WORKERS} threads",
        policy,
        len(tried),
        len(refused),
        fake.wire_count,
        guard.usage.calls,
        seconds,
    )


async def with_tasks(policy: str, attempts: int) -> Result:
    fake = FakeProvider(default=Reply(delay=DELAY))
    client = fake.async_openai()
    tried = refused = 0

    async def worker() -> None:
        nonlocal tried, refused
        for _ in range(attempts):
            tried += 1
            try:
                await ask(client)
            except BudgetExceeded:
                refused += 1
                if policy == "stop":
                    return

    began = time.perf_counter()
    async with RunGuard(max_calls=LIMIT, raise_on_exit=False) as guard:
        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    seconds = time.perf_counter() - began
    await client.close()
    return Result(
        f"{WORKERS} asyncio tasks",
        policy,
        tried,
        refused,
        fake.wire_count,
        guard.usage.calls,
        seconds,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="max_calls under 64 racing threads and tasks.")
    parser.add_argument("--quick", action="store_true", help="fewer attempts per worker")
    args = parser.parse_args()
    # "stop" workers call until refused; "retry" workers make this many attempts each.
    retries = 4 if args.quick else 20
    stop = LIMIT  # more than any worker can get admitted: every worker ends refused

    results = [
        with_threads("stop", stop),
        with_threads("retry", retries),
        asyncio.run(with_tasks("stop", stop)),
        asyncio.run(with_tasks("retry", retries)),
    ]

    print(f"RunGuard(max_calls={LIMIT}); every call answered after {DELAY * 1000:.0f} ms")
    header = ("workers", "policy", "attempts", "refused", "reached the wire", "usage.calls", "s")
    print(
        f"{header[0]:<18}{header[1]:<8}{header[2]:>9}{header[3]:>9}{header[4]:>18}"
        f"{header[5]:>13}{header[6]:>7}"
    )
    for r in results:
        print(
            f"{r.workers:<18}{r.policy:<8}{r.attempts:>9}{r.refused:>9}{r.wire:>18}"
            f"{r.calls:>13}{r.seconds:>7.2f}"
        )
    wrong = [r for r in results if r.wire != LIMIT or r.calls != LIMIT]
    if wrong:
        print(f"FAIL: {len(wrong)} runs sent or counted other than {LIMIT} calls")
        return 1
    print(f"OK: exactly {LIMIT} requests reached the wire in every run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
