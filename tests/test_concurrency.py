"""The bar: under heavy concurrency, exactly the admitted number of calls reaches the wire.

Every worker loops calls until refused ("stop"), or swallows the refusal and
tries a few more times ("continue"). Replies are delayed so calls overlap.
The fake provider's request count is the ground truth.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from runguard import BudgetExceeded, Price, RunGuard, propagate
from runguard.testing import FakeProvider, Reply

THREADS = 64
TASKS = 64
LIMIT = 100
EXTRA_TRIES = 3
DELAY = 0.002
MESSAGES = [{"role": "user", "content": "hello"}]


def call(client: Any, kind: str, model: str, max_tokens: int) -> None:
    """One LLM call of the given kind; streams are read to the end."""
    if kind == "openai":
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens)
    elif kind == "openai-stream":
        stream = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, stream=True
        )
        for _ in stream:
            pass
    elif kind == "anthropic":
        client.messages.create(model=model, messages=MESSAGES, max_tokens=max_tokens)
    else:
        raise AssertionError(kind)


async def acall(client: Any, kind: str, model: str, max_tokens: int) -> None:
    if kind == "openai":
        await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens)
    elif kind == "openai-stream":
        stream = await client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, stream=True
        )
        async for _ in stream:
            pass
    elif kind == "anthropic":
        await client.messages.create(model=model, messages=MESSAGES, max_tokens=max_tokens)
    else:
        raise AssertionError(kind)


def workers_plan(fake: FakeProvider, mode: str, is_async: bool) -> list[tuple[Any, str]]:
    """(client, kind) per worker: one shared OpenAI client, or one mixed client each."""
    if mode == "shared":
        client = fake.async_openai(max_retries=0) if is_async else fake.openai(max_retries=0)
        return [(client, "openai")] * THREADS
    plan = []
    for i in range(THREADS):
        if i % 3 == 2:
            client = fake.async_anthropic if is_async else fake.anthropic
            plan.append((client(max_retries=0), "anthropic"))
        else:
            client = fake.async_openai if is_async else fake.openai
            plan.append((client(max_retries=0), "openai-stream" if i % 3 == 1 else "openai"))
    return plan


def run_threads(n: int, work: Callable[[int], None], wrap=lambda f: f) -> list[BaseException]:
    """Start ``n`` threads on a barrier; return what they raised."""
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # report, never hide
            errors.append(exc)

    threads = [threading.Thread(target=wrap(body), args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def assert_settled(guard: RunGuard) -> None:
    account = guard._account
    assert account.reserved_calls == 0
    assert account.reserved_input_tokens == 0
    assert account.reserved_output_tokens == 0
    assert account.reserved_cost_usd == 0


@pytest.mark.parametrize("mode", ["shared", "own"])
@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_threads_under_a_process_guard_send_exactly_the_limit(mode: str, policy: str) -> None:
    fake = FakeProvider(default=Reply(input_tokens=10, output_tokens=5, delay=DELAY))
    plan = workers_plan(fake, mode, is_async=False)
    allowed_refusals = 1 + (EXTRA_TRIES if policy == "continue" else 0)
    sent = [0] * THREADS
    refused = [0] * THREADS

    def work(i: int) -> None:
        client, kind = plan[i]
        while refused[i] < allowed_refusals:
            try:
                call(client, kind, "gpt-4o-mini", 16)
                sent[i] += 1
            except BudgetExceeded:
                refused[i] += 1

    with RunGuard(max_calls=LIMIT, scope="process", raise_on_exit=False) as guard:
        errors = run_threads(THREADS, work)
    assert errors == []
    assert fake.wire_count == LIMIT
    assert sum(sent) == LIMIT
    assert refused == [allowed_refusals] * THREADS
    usage = guard.usage
    assert usage.calls == LIMIT
    assert usage.input_tokens == 10 * LIMIT
    assert usage.output_tokens == 5 * LIMIT
    assert guard.trip is not None and guard.trip.guard == "max_calls"
    assert_settled(guard)


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_threads_under_a_propagated_context_guard_send_exactly_the_limit(policy: str) -> None:
    fake = FakeProvider(default=Reply(input_tokens=10, output_tokens=5, delay=DELAY))
    client = fake.openai(max_retries=0)
    allowed_refusals = 1 + (EXTRA_TRIES if policy == "continue" else 0)
    sent = [0] * THREADS

    def work(i: int) -> None:
        refusals = 0
        while refusals < allowed_refusals:
            try:
                call(client, "openai", "gpt-4o-mini", 16)
                sent[i] += 1
            except BudgetExceeded:
                refusals += 1

    with RunGuard(max_calls=LIMIT, raise_on_exit=False) as guard:
        errors = run_threads(THREADS, work, wrap=propagate)
    assert errors == []
    assert fake.wire_count == LIMIT == sum(sent)
    assert guard.usage.calls == LIMIT
    assert_settled(guard)


@pytest.mark.parametrize("mode", ["shared", "own"])
@pytest.mark.parametrize("policy", ["stop", "continue"])
async def test_tasks_under_a_context_guard_send_exactly_the_limit(mode: str, policy: str) -> None:
    fake = FakeProvider(default=Reply(input_tokens=10, output_tokens=5, delay=DELAY))
    plan = workers_plan(fake, mode, is_async=True)
    allowed_refusals = 1 + (EXTRA_TRIES if policy == "continue" else 0)
    sent = [0] * TASKS
    refused = [0] * TASKS
    start = asyncio.Event()

    async def work(i: int) -> None:
        client, kind = plan[i]
        await start.wait()
        while refused[i] < allowed_refusals:
            try:
                await acall(client, kind, "gpt-4o-mini", 16)
                sent[i] += 1
            except BudgetExceeded:
                refused[i] += 1

    async with RunGuard(max_calls=LIMIT, raise_on_exit=False) as guard:
        tasks = [asyncio.create_task(work(i)) for i in range(TASKS)]
        await asyncio.sleep(0)
        start.set()
        await asyncio.gather(*tasks)
    assert fake.wire_count == LIMIT
    assert sum(sent) == LIMIT
    assert refused == [allowed_refusals] * TASKS
    assert guard.usage.calls == LIMIT
    assert guard.usage.input_tokens == 10 * LIMIT
    assert_settled(guard)


# -- a dollar ceiling ---------------------------------------------------------------------

MODEL = "house-model"
MAX_TOKENS = 1000
# Input is free, so the worst case of a call does not depend on the input
# estimate: it is MAX_TOKENS output tokens at $1 per million, $0.001.
PRICES = {MODEL: Price(input=0.0, output=1.0)}
WORST = MAX_TOKENS * 1e-6
N = 37
COST_LIMIT = N * WORST * (1 + 1e-9)  # N worst cases fit, N + 1 do not


@pytest.mark.parametrize("policy", ["stop", "continue"])
def test_threads_under_a_dollar_ceiling(policy: str) -> None:
    # Every reply costs exactly its worst case, so no settlement frees budget.
    fake = FakeProvider(default=Reply(input_tokens=25, output_tokens=MAX_TOKENS, delay=DELAY))
    plan = workers_plan(fake, "own", is_async=False)
    allowed_refusals = 1 + (EXTRA_TRIES if policy == "continue" else 0)

    def work(i: int) -> None:
        client, kind = plan[i]
        refusals = 0
        while refusals < allowed_refusals:
            try:
                call(client, kind, MODEL, MAX_TOKENS)
            except BudgetExceeded:
                refusals += 1

    with RunGuard(
        max_cost_usd=COST_LIMIT, prices=PRICES, scope="process", raise_on_exit=False
    ) as guard:
        errors = run_threads(THREADS, work)
    assert errors == []
    assert fake.wire_count == N
    usage = guard.usage
    assert usage.calls == N
    assert usage.cost_usd <= COST_LIMIT
    assert usage.cost_usd == pytest.approx(N * WORST)
    assert guard.trip is not None and guard.trip.guard == "max_cost_usd"
    assert_settled(guard)


async def test_tasks_under_a_dollar_ceiling() -> None:
    fake = FakeProvider(default=Reply(input_tokens=25, output_tokens=MAX_TOKENS, delay=DELAY))
    plan = workers_plan(fake, "own", is_async=True)
    start = asyncio.Event()

    async def work(i: int) -> None:
        client, kind = plan[i]
        await start.wait()
        while True:
            try:
                await acall(client, kind, MODEL, MAX_TOKENS)
            except BudgetExceeded:
                return

    async with RunGuard(max_cost_usd=COST_LIMIT, prices=PRICES, raise_on_exit=False) as guard:
        tasks = [asyncio.create_task(work(i)) for i in range(TASKS)]
        await asyncio.sleep(0)
        start.set()
        await asyncio.gather(*tasks)
    assert fake.wire_count == N
    assert guard.usage.calls == N
    assert guard.usage.cost_usd <= COST_LIMIT
    assert_settled(guard)


def test_threads_under_a_dollar_ceiling_with_cheaper_replies() -> None:
    # Replies cost a tenth of the worst case: settled calls free budget, so more
    # than N calls may go, but spend can never pass the ceiling.
    fake = FakeProvider(default=Reply(input_tokens=25, output_tokens=MAX_TOKENS // 10, delay=DELAY))
    plan = workers_plan(fake, "own", is_async=False)

    def work(i: int) -> None:
        client, kind = plan[i]
        for _ in range(6):
            try:
                call(client, kind, MODEL, MAX_TOKENS)
            except BudgetExceeded:
                return

    with RunGuard(
        max_cost_usd=COST_LIMIT, prices=PRICES, scope="process", raise_on_exit=False
    ) as guard:
        errors = run_threads(THREADS, work)
    assert errors == []
    usage = guard.usage
    assert usage.calls == fake.wire_count
    assert fake.wire_count >= N
    assert usage.cost_usd <= COST_LIMIT
    assert usage.cost_usd == pytest.approx(fake.wire_count * WORST / 10)
    assert_settled(guard)
