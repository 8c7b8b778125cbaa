"""``max_llm_seconds`` and ``max_wall_seconds`` over the real ``openai`` and ``anthropic`` SDKs.

Ground truth is what reached the fake wire (``fake.wire_count``) and the delays
the scripted replies slept before answering. Durations are never asserted: a
delay or an agent's sleep is a lower bound on the time that passes, and load
only adds to it, so every threshold below is chosen so that extra time cannot
flip the result (each one says which way it is safe). The guard's own
``llm_seconds`` is only ever checked against a lower bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anthropic
import openai
import pytest

from runguard import GuardTripped, LatencyBudgetExceeded, RunGuard, guarded
from runguard.testing import FakeProvider, Reply, WireRequest

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "hi"}]
KINDS = ["openai", "openai-stream", "anthropic", "anthropic-stream"]

# The trip case: each call sleeps DELAY at the provider; the limit is 2.8 calls' worth.
# Three calls always take at least 3 * DELAY > LIMIT (load only adds time), so the
# fourth is always refused; two calls stay under the limit unless their overhead
# exceeds 0.8 * DELAY = 0.16 s in all, far more than a loaded machine adds.
DELAY = 0.2
LIMIT = 2.8 * DELAY

# The wall-clock limit: a first call made at once is far inside it; the agent then
# sleeps past it by a margin (the sleep is a lower bound, so it is always past).
WALL = 0.5


# -- helpers ---------------------------------------------------------------------------


def make_client(fake: FakeProvider, kind: str, is_async: bool = False, max_retries: int = 0) -> Any:
    if kind.startswith("anthropic"):
        factory = fake.async_anthropic if is_async else fake.anthropic
    else:
        factory = fake.async_openai if is_async else fake.openai
    return factory(max_retries=max_retries)


def call(client: Any, kind: str, pause: float = 0.0) -> str:
    """One LLM call; a stream is read to its end, the agent sleeping ``pause`` per event.

    Returns the text of the answer, so a caller can see the call was not cut short.
    """
    stream = kind.endswith("-stream")
    if kind.startswith("anthropic"):
        result = client.messages.create(
            model=CLAUDE, max_tokens=16, messages=MESSAGES, stream=stream
        )
        if not stream:
            return "".join(block.text for block in result.content)
        text = []
        for event in result:
            time.sleep(pause)
            if event.type == "content_block_delta":
                text.append(event.delta.text)
        return "".join(text)
    result = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stream=stream
    )
    if not stream:
        return result.choices[0].message.content
    text = []
    for chunk in result:
        time.sleep(pause)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    return "".join(text)


async def acall(client: Any, kind: str, pause: float = 0.0) -> str:
    stream = kind.endswith("-stream")
    if kind.startswith("anthropic"):
        result = await client.messages.create(
            model=CLAUDE, max_tokens=16, messages=MESSAGES, stream=stream
        )
        if not stream:
            return "".join(block.text for block in result.content)
        text = []
        async for event in result:
            await asyncio.sleep(pause)
            if event.type == "content_block_delta":
                text.append(event.delta.text)
        return "".join(text)
    result = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, stream=stream
    )
    if not stream:
        return result.choices[0].message.content
    text = []
    async for chunk in result:
        await asyncio.sleep(pause)
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
    return "".join(text)


def warmed(fake: FakeProvider, kind: str, max_retries: int = 0) -> Any:
    """A client that has made one instant call already (one-time costs kept out of the tests).

    The warm-up call is on the wire: tests count from ``fake.wire_count`` after it.
    """
    client = make_client(fake, kind, max_retries=max_retries)
    fake.script(Reply())
    with RunGuard():
        call(client, kind)
    return client


async def awarmed(fake: FakeProvider, kind: str, max_retries: int = 0) -> Any:
    client = make_client(fake, kind, True, max_retries)
    fake.script(Reply())
    with RunGuard():
        await acall(client, kind)
    return client


def try_call(client: Any, kind: str, outcomes: list[str], pause: float = 0.0) -> None:
    try:
        call(client, kind, pause)
    except LatencyBudgetExceeded:
        outcomes.append("refused")
    else:
        outcomes.append("sent")


async def atry_call(client: Any, kind: str, outcomes: list[str]) -> None:
    try:
        await acall(client, kind)
    except LatencyBudgetExceeded:
        outcomes.append("refused")
    else:
        outcomes.append("sent")


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=Reply(text="hello there", input_tokens=7, output_tokens=3))


@pytest.fixture
def slow() -> FakeProvider:
    """Every answer comes DELAY seconds after the request."""
    return FakeProvider(default=Reply(text="hello there", delay=DELAY))


# -- max_llm_seconds: the trip -----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_llm_seconds_refuse_the_call_after_the_one_that_crossed_the_limit(
    slow: FakeProvider, kind: str
) -> None:
    client = warmed(slow, kind)
    before = slow.wire_count
    outcomes: list[str] = []
    with pytest.raises(LatencyBudgetExceeded) as at_exit, RunGuard(max_llm_seconds=LIMIT) as guard:
        for _ in range(6):
            try_call(client, kind, outcomes)
    assert slow.wire_count - before == 3
    assert outcomes == ["sent"] * 3 + ["refused"] * 3
    trip = at_exit.value.trip
    assert trip is guard.trip
    assert trip.guard == "max_llm_seconds"
    assert trip.limit == LIMIT
    assert trip.observed >= 3 * DELAY
    assert guard.usage.calls == 3
    assert guard.usage.llm_seconds >= 3 * DELAY


@pytest.mark.parametrize("kind", KINDS)
async def test_async_llm_seconds_refuse_the_call_after_the_one_that_crossed_the_limit(
    slow: FakeProvider, kind: str
) -> None:
    client = await awarmed(slow, kind)
    before = slow.wire_count
    outcomes: list[str] = []
    with pytest.raises(LatencyBudgetExceeded), RunGuard(max_llm_seconds=LIMIT) as guard:
        for _ in range(5):
            await atry_call(client, kind, outcomes)
    assert slow.wire_count - before == 3
    assert outcomes == ["sent"] * 3 + ["refused"] * 2
    assert guard.usage.llm_seconds >= 3 * DELAY


def test_the_guard_latches_when_the_call_that_crosses_the_limit_ends(slow: FakeProvider) -> None:
    client = warmed(slow, "openai")
    with RunGuard(max_llm_seconds=LIMIT, raise_on_exit=False) as guard:
        for _ in range(3):
            assert not guard.tripped  # checked before the call: still under the limit
            assert call(client, "openai") == "hello there"
        # no further call was tried: the check after the third call latched the guard
        assert guard.trip is not None and guard.trip.guard == "max_llm_seconds"
        sent = slow.wire_count
        with pytest.raises(LatencyBudgetExceeded):
            call(client, "openai")
    assert slow.wire_count == sent


@pytest.mark.parametrize("kind", KINDS)
def test_a_call_in_progress_is_never_cut_short(fake: FakeProvider, kind: str) -> None:
    client = warmed(fake, kind)
    before = fake.wire_count
    fake.script(Reply(text="a long answer", delay=0.3))  # far longer than the limit
    with RunGuard(max_llm_seconds=0.05, raise_on_exit=False) as guard:
        assert call(client, kind) == "a long answer"
        assert guard.tripped
        with pytest.raises(LatencyBudgetExceeded):
            call(client, kind)
    assert fake.wire_count - before == 1


def test_a_tripped_llm_seconds_guard_is_raised_at_the_end_of_the_block(slow: FakeProvider) -> None:
    client = warmed(slow, "anthropic")
    before = slow.wire_count
    with pytest.raises(LatencyBudgetExceeded), RunGuard(max_llm_seconds=LIMIT):
        for _ in range(3):
            call(client, "anthropic")  # no refusal seen inside the block
    assert slow.wire_count - before == 3


# -- max_llm_seconds: what counts and what does not -------------------------------------------


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_time_the_agent_spends_between_calls_does_not_count(fake: FakeProvider, kind: str) -> None:
    # 6 calls of 0.01 s with 0.15 s of agent time before each: 0.9 s of agent time alone
    # would trip a 0.5 s limit; the calls themselves would need 0.44 s of overhead to.
    fake.default = Reply(delay=0.01)
    client = warmed(fake, kind)
    before = fake.wire_count
    with RunGuard(max_llm_seconds=0.5) as guard:
        for _ in range(6):
            time.sleep(0.15)  # a tool, a tracking write ...
            call(client, kind)
    assert fake.wire_count - before == 6
    assert not guard.tripped
    assert guard.usage.llm_seconds >= 6 * 0.01


@pytest.mark.parametrize("kind", ["openai-stream", "anthropic-stream"])
def test_time_the_agent_spends_between_stream_events_does_not_count(
    fake: FakeProvider, kind: str
) -> None:
    # the agent sleeps 0.1 s per event, 0.5 s or more per stream, against a 0.4 s limit
    fake.default = Reply(text="hello there", chunks=3)
    client = warmed(fake, kind)
    before = fake.wire_count
    with RunGuard(max_llm_seconds=0.4) as guard:
        for _ in range(2):
            assert call(client, kind, pause=0.1) == "hello there"
    assert fake.wire_count - before == 2
    assert not guard.tripped


async def test_async_time_between_calls_does_not_count(fake: FakeProvider) -> None:
    fake.default = Reply(delay=0.01)
    client = await awarmed(fake, "openai")
    before = fake.wire_count
    with RunGuard(max_llm_seconds=0.5) as guard:
        for _ in range(6):
            await asyncio.sleep(0.15)
            await acall(client, "openai")
    assert fake.wire_count - before == 6
    assert not guard.tripped


@pytest.mark.parametrize("kind", KINDS)
def test_llm_seconds_are_at_least_the_delays_of_the_calls_sent(
    fake: FakeProvider, kind: str
) -> None:
    delays = [0.05, 0.02, 0.08, 0.0, 0.03]
    client = warmed(fake, kind)
    fake.script(*(Reply(delay=d) for d in delays))
    with RunGuard(max_llm_seconds=100) as guard:
        for _ in delays:
            call(client, kind)
    assert guard.usage.llm_seconds >= sum(delays)


async def test_async_llm_seconds_are_at_least_the_delays_of_the_calls_sent(
    fake: FakeProvider,
) -> None:
    delays = [0.05, 0.02, 0.08]
    clients = {kind: await awarmed(fake, kind) for kind in KINDS}
    fake.script(*(Reply(delay=d) for d in delays * len(KINDS)))
    with RunGuard(max_llm_seconds=100) as guard:
        for kind, client in clients.items():
            for _ in delays:
                await acall(client, kind)
    assert guard.usage.llm_seconds >= sum(delays) * len(KINDS)


def test_failed_calls_and_sdk_retries_count_their_time(fake: FakeProvider) -> None:
    client = warmed(fake, "openai", max_retries=1)
    fake.script(
        Reply(status=500, delay=0.05, headers={"retry-after-ms": "1"}),
        Reply(delay=0.05),  # the SDK's retry of the first call
        Reply(status=400, delay=0.05),  # not retried: the SDK raises it
    )
    with RunGuard(max_llm_seconds=100) as guard:
        call(client, "openai")
        with pytest.raises(openai.BadRequestError):
            call(client, "openai")
    assert guard.usage.llm_seconds >= 0.15


async def test_concurrent_calls_each_count_their_own_time(fake: FakeProvider) -> None:
    # four calls that overlap for 0.3 s count 1.2 s of LLM time
    client = await awarmed(fake, "anthropic")
    before = fake.wire_count
    fake.default = Reply(delay=0.3)
    with RunGuard(max_llm_seconds=0.5, raise_on_exit=False) as guard:
        # all four are admitted together, before any of them has spent anything
        await asyncio.gather(*(acall(client, "anthropic") for _ in range(4)))
        assert guard.usage.llm_seconds >= 4 * 0.3
        assert guard.tripped
        with pytest.raises(LatencyBudgetExceeded):
            await acall(client, "anthropic")
    assert fake.wire_count - before == 4


class SlowStreamFake(FakeProvider):
    """A FakeProvider whose streams send each server-sent event ``gap`` seconds apart.

    FakeProvider sleeps a reply's delay before answering, so a stream's body
    arrives all at once; this one makes reading the stream itself take time
    (sync clients only).
    """

    def __init__(self, gap: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gap = gap

    def _respond(self, request: Any, wire: WireRequest, reply: Reply) -> Any:
        response = super()._respond(request, wire, reply)
        if response.headers.get("content-type") != "text/event-stream":
            return response
        events = [event + b"\n\n" for event in response.content.split(b"\n\n") if event]
        gap = self.gap

        def trickle() -> Any:
            for event in events:
                time.sleep(gap)
                yield event

        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        return type(response)(response.status_code, headers=headers, content=trickle())


@pytest.mark.parametrize("kind", ["openai-stream", "anthropic-stream"])
def test_time_reading_a_stream_counts(kind: str) -> None:
    fake = SlowStreamFake(gap=0.05, default=Reply(text="hello there", chunks=4))
    client = warmed(fake, kind)
    before = fake.wire_count
    with RunGuard(max_llm_seconds=0.2, raise_on_exit=False) as guard:
        assert call(client, kind) == "hello there"  # the read is never cut short
        # at least 6 events, 0.05 s apart, were read inside the stream's iterator
        assert guard.usage.llm_seconds >= 6 * 0.05
        assert guard.tripped
        with pytest.raises(LatencyBudgetExceeded):
            call(client, kind)
    assert fake.wire_count - before == 1


# -- max_wall_seconds ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_call_after_the_wall_limit_is_refused_with_nothing_sent(
    fake: FakeProvider, kind: str
) -> None:
    client = warmed(fake, kind)
    before = fake.wire_count
    with pytest.raises(LatencyBudgetExceeded) as info, RunGuard(max_wall_seconds=WALL) as guard:
        call(client, kind)  # at once: far inside the limit
        assert fake.wire_count - before == 1
        time.sleep(WALL + 0.1)
        call(client, kind)
    assert fake.wire_count - before == 1
    assert info.value.trip is guard.trip
    assert info.value.trip.guard == "max_wall_seconds"
    assert info.value.trip.observed >= WALL + 0.1
    assert guard.usage.calls == 1


def test_the_wall_clock_runs_from_entering_the_guard(fake: FakeProvider) -> None:
    client = warmed(fake, "openai")
    guard = RunGuard(max_wall_seconds=WALL)
    time.sleep(WALL + 0.1)  # a guard made long ago, but entered now
    before = fake.wire_count
    with guard:
        call(client, "openai")
    assert fake.wire_count - before == 1
    assert not guard.tripped


def test_a_call_that_outlasts_the_wall_limit_latches_the_guard_when_it_ends(
    fake: FakeProvider,
) -> None:
    client = warmed(fake, "openai")
    before = fake.wire_count
    fake.script(Reply(text="slow answer", delay=WALL + 0.1))
    with RunGuard(max_wall_seconds=WALL, raise_on_exit=False) as guard:
        assert call(client, "openai") == "slow answer"  # admitted at once, never cut short
        assert guard.trip is not None and guard.trip.guard == "max_wall_seconds"
        with pytest.raises(LatencyBudgetExceeded):
            call(client, "openai")
    assert fake.wire_count - before == 1


async def test_async_call_after_the_wall_limit_is_refused_with_nothing_sent(
    fake: FakeProvider,
) -> None:
    clients = {kind: await awarmed(fake, kind) for kind in KINDS}
    before = fake.wire_count
    with RunGuard(max_wall_seconds=WALL, raise_on_exit=False) as guard:
        await acall(clients["openai"], "openai")
        await asyncio.sleep(WALL + 0.1)
        for kind, client in clients.items():
            with pytest.raises(LatencyBudgetExceeded):
                await acall(client, kind)
    assert fake.wire_count - before == 1
    assert guard.trip is not None and guard.trip.guard == "max_wall_seconds"


# -- @guarded on async functions --------------------------------------------------------------


async def test_guarded_async_function_trips_on_llm_seconds(slow: FakeProvider) -> None:
    client = await awarmed(slow, "openai-stream")
    before = slow.wire_count
    outcomes: list[str] = []

    @guarded(max_llm_seconds=LIMIT)
    async def agent() -> None:
        for _ in range(5):
            await atry_call(client, "openai-stream", outcomes)

    with pytest.raises(LatencyBudgetExceeded):
        await agent()
    assert slow.wire_count - before == 3
    assert outcomes == ["sent"] * 3 + ["refused"] * 2


async def test_guarded_async_function_trips_on_wall_seconds(fake: FakeProvider) -> None:
    client = await awarmed(fake, "anthropic")
    before = fake.wire_count

    @guarded(max_wall_seconds=WALL)
    async def agent() -> str:
        await acall(client, "anthropic")
        await asyncio.sleep(WALL + 0.1)
        return await acall(client, "anthropic")

    with pytest.raises(LatencyBudgetExceeded):
        await agent()
    assert fake.wire_count - before == 1
    # each invocation gets a fresh guard, with its own clock
    with pytest.raises(LatencyBudgetExceeded):
        await agent()
    assert fake.wire_count - before == 2


# -- nesting ----------------------------------------------------------------------------------


def test_outer_wall_limit_trips_inside_an_inner_guard_without_one(fake: FakeProvider) -> None:
    client = warmed(fake, "openai")
    before = fake.wire_count
    with pytest.raises(LatencyBudgetExceeded), RunGuard(max_wall_seconds=WALL, name="outer"):
        with RunGuard(max_calls=100, name="inner") as inner:
            call(client, "openai")
            time.sleep(WALL + 0.1)
            with pytest.raises(LatencyBudgetExceeded) as info:
                call(client, "openai")
        assert not inner.tripped
    assert info.value.trip.run == "outer"
    assert info.value.trip.guard == "max_wall_seconds"
    assert fake.wire_count - before == 1


def test_outer_llm_limit_is_charged_for_calls_inside_an_inner_guard(slow: FakeProvider) -> None:
    client = warmed(slow, "anthropic")
    before = slow.wire_count
    outcomes: list[str] = []
    with pytest.raises(LatencyBudgetExceeded), RunGuard(max_llm_seconds=LIMIT, name="outer"):
        with RunGuard(max_calls=100, name="inner") as inner:
            for _ in range(5):
                try_call(client, "anthropic", outcomes)
        assert inner.usage.llm_seconds >= 3 * DELAY
        assert not inner.tripped
    assert outcomes == ["sent"] * 3 + ["refused"] * 2
    assert slow.wire_count - before == 3


# -- the exception ---------------------------------------------------------------------------


def test_latency_budget_exceeded_is_a_trip_and_not_an_sdk_error() -> None:
    assert issubclass(LatencyBudgetExceeded, GuardTripped)
    for sdk_error in (openai.OpenAIError, anthropic.AnthropicError):
        assert not issubclass(LatencyBudgetExceeded, sdk_error)
