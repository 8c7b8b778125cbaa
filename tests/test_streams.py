"""Streams under RunGuard: usage injection, what the caller sees, and abandoned streams.

Ground truth is the fake wire (``fake.requests``) and the same call made
outside any guard; usage must match the scripted :class:`Reply`.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from typing import Any

import anthropic
import genai_prices
import openai
import pytest

import runguard.providers.openai
from _sdk import accepts, chat_helper, surface
from _subprocess import run
from runguard import BudgetExceeded, RunGuard, Usage
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o"
CLAUDE = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Say hello"}]
REPLY = Reply(text="Hello there, dear friend", input_tokens=31, output_tokens=7, chunks=4)
#: output cap of the streams that get abandoned (what an estimate must charge)
CAP = 50


def catalogue_price(model: str, provider: str, **tokens: int) -> float:
    usage = genai_prices.Usage(**tokens)
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


def assert_exact(usage: Usage, model: str = MODEL, provider: str = "openai") -> None:
    assert usage.calls == 1
    assert usage.input_tokens == REPLY.input_tokens
    assert usage.output_tokens == REPLY.output_tokens
    assert usage.estimated_calls == 0
    expected = catalogue_price(
        model, provider, input_tokens=REPLY.input_tokens, output_tokens=REPLY.output_tokens
    )
    assert usage.cost_usd == pytest.approx(expected)


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=REPLY)


@pytest.fixture
def client(fake: FakeProvider) -> openai.OpenAI:
    return fake.openai(max_retries=0)


@pytest.fixture
def aclient(fake: FakeProvider) -> openai.AsyncOpenAI:
    return fake.async_openai(max_retries=0)


@pytest.fixture
def claude(fake: FakeProvider) -> anthropic.Anthropic:
    return fake.anthropic(max_retries=0)


@pytest.fixture
def aclaude(fake: FakeProvider) -> anthropic.AsyncAnthropic:
    return fake.async_anthropic(max_retries=0)


def chat_stream(client: Any, **extra: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **extra)


# -- chat completion streams: usage injected, usage chunk hidden ---------------------


def test_chat_stream_asks_for_usage_and_hides_the_extra_chunk(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    unguarded = list(chat_stream(client))
    with RunGuard() as guard:
        chunks = list(chat_stream(client))
        # a consumer written for a stream without usage keeps working
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    outside, inside = fake.requests
    assert "stream_options" not in outside.body
    assert inside.body["stream_options"] == {"include_usage": True}
    assert len(chunks) == len(unguarded)
    assert all(chunk.usage is None for chunk in chunks)
    assert text == REPLY.text
    assert_exact(guard.usage)


async def test_async_chat_stream_asks_for_usage_and_hides_the_extra_chunk(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    unguarded = [chunk async for chunk in await chat_stream(aclient)]
    with RunGuard() as guard:
        chunks = [chunk async for chunk in await chat_stream(aclient)]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert "stream_options" not in fake.requests[0].body
    assert fake.requests[1].body["stream_options"] == {"include_usage": True}
    assert len(chunks) == len(unguarded)
    assert text == REPLY.text
    assert_exact(guard.usage)


def test_chat_stream_usage_chunk_the_caller_asked_for_is_visible(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    accepts(client.chat.completions.create, "stream_options")
    asked = {"stream_options": {"include_usage": True}}
    unguarded = list(chat_stream(client, **asked))
    with RunGuard() as guard:
        chunks = list(chat_stream(client, **asked))
    assert fake.requests[1].body["stream_options"] == {"include_usage": True}
    assert len(chunks) == len(unguarded)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        guard.usage.input_tokens,
        guard.usage.output_tokens,
    )
    assert_exact(guard.usage)


async def test_async_chat_stream_usage_chunk_the_caller_asked_for_is_visible(
    aclient: openai.AsyncOpenAI,
) -> None:
    accepts(aclient.chat.completions.create, "stream_options")
    with RunGuard() as guard:
        stream = await chat_stream(aclient, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == REPLY.output_tokens
    assert_exact(guard.usage)


def test_chat_stream_keeps_the_callers_other_stream_options(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    accepts(client.chat.completions.create, "stream_options")
    unguarded = list(chat_stream(client, stream_options={"include_obfuscation": False}))
    with RunGuard() as guard:
        chunks = list(chat_stream(client, stream_options={"include_obfuscation": False}))
    assert fake.requests[1].body["stream_options"] == {
        "include_obfuscation": False,
        "include_usage": True,
    }
    assert len(chunks) == len(unguarded)
    assert all(chunk.choices for chunk in chunks)
    assert_exact(guard.usage)


def test_chat_stream_usage_asked_for_through_extra_body_is_visible(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    asked = {"extra_body": {"stream_options": {"include_usage": True}}}
    unguarded = list(chat_stream(client, **asked))
    assert unguarded[-1].usage is not None  # the SDK itself delivers it
    with RunGuard() as guard:
        chunks = list(chat_stream(client, **asked))
    assert len(chunks) == len(unguarded)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert_exact(guard.usage)


def test_chat_stream_options_in_extra_body_do_not_cancel_the_usage_request(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    # extra_body is merged over the body after RunGuard prepared it; the
    # caller's stream_options must not wipe out include_usage on the wire.
    with RunGuard() as guard:
        chunks = list(chat_stream(client, extra_body={"stream_options": {"x_custom": 1}}))
    sent = fake.requests[0].body["stream_options"]
    assert sent.get("include_usage") is True, sent
    assert sent.get("x_custom") == 1
    assert all(chunk.choices for chunk in chunks)
    assert_exact(guard.usage)


class _Interrupted(BaseException):
    """Stands in for KeyboardInterrupt, which pytest would take as its own."""


def _failing_prepare(error: BaseException) -> Callable[..., Any]:
    def prepare(options: Any, call: Any) -> Any:
        raise error

    return prepare


def test_chat_stream_that_cannot_be_prepared_is_sent_unchanged_and_charged_its_worst_case(
    fake: FakeProvider,
    client: openai.OpenAI,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(runguard.providers.openai, "prepare", _failing_prepare(RuntimeError("x")))
    with RunGuard(max_calls=2) as guard:
        chunks = list(chat_stream(client, max_tokens=CAP))
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    first, second = fake.requests
    assert "stream_options" not in first.body  # the caller's request, as made
    assert second.body["messages"] == MESSAGES
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == REPLY.text
    assert "could not prepare a stream" in caplog.text
    assert guard.usage.calls == 2
    assert guard.usage.estimated_calls == 1  # the stream brought no usage: its worst case
    assert guard.usage.output_tokens == CAP + REPLY.output_tokens


def test_chat_stream_interrupted_while_prepared_releases_its_reservation(
    fake: FakeProvider, client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runguard.providers.openai, "prepare", _failing_prepare(_Interrupted()))
    with RunGuard(max_calls=1) as guard:
        with pytest.raises(_Interrupted):
            chat_stream(client)
        assert not fake.requests
        # a reservation left behind would refuse this call
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert len(fake.requests) == 1
    assert guard.usage.calls == 1
    assert guard.trip is None


def test_chat_stream_helper_is_counted_once_with_exact_usage(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    chat_stream_helper = chat_helper(client)
    with chat_stream_helper(model=MODEL, messages=MESSAGES) as stream:
        unguarded = [event.type for event in stream]
    with (
        RunGuard() as guard,
        chat_stream_helper(model=MODEL, messages=MESSAGES) as stream,
    ):
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert fake.requests[1].body["stream_options"] == {"include_usage": True}
    assert fake.wire_count == 2
    assert events == unguarded
    assert final.choices[0].message.content == REPLY.text
    assert_exact(guard.usage)


async def test_async_chat_stream_helper_is_counted_once_with_exact_usage(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    chat_stream_helper = chat_helper(aclient)
    with RunGuard() as guard:
        async with chat_stream_helper(model=MODEL, messages=MESSAGES) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_completion()
    assert fake.wire_count == 1
    assert fake.requests[0].body["stream_options"] == {"include_usage": True}
    assert final.choices[0].message.content == REPLY.text
    assert_exact(guard.usage)


def test_chat_stream_helper_shows_usage_the_caller_asked_for(client: openai.OpenAI) -> None:
    chat_stream_helper = chat_helper(client)
    with (
        RunGuard() as guard,
        chat_stream_helper(
            model=MODEL, messages=MESSAGES, stream_options={"include_usage": True}
        ) as stream,
    ):
        final = stream.get_final_completion()
    assert final.usage is not None
    assert final.usage.prompt_tokens == REPLY.input_tokens
    assert_exact(guard.usage)


# -- Responses streams: usage always arrives, nothing to inject ----------------------


def test_responses_create_stream_is_counted_once_with_exact_usage(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    responses = surface(client, "responses")
    unguarded = [event.type for event in responses.create(model=MODEL, input="hi", stream=True)]
    with RunGuard() as guard:
        events = [event.type for event in responses.create(model=MODEL, input="hi", stream=True)]
    assert "stream_options" not in fake.requests[1].body
    assert events == unguarded
    assert_exact(guard.usage)


async def test_async_responses_create_stream_is_counted_once_with_exact_usage(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    responses = surface(aclient, "responses")
    with RunGuard() as guard:
        stream = await responses.create(model=MODEL, input="hi", stream=True)
        events = [event.type async for event in stream]
    assert fake.wire_count == 1
    assert events[-1] == "response.completed"
    assert_exact(guard.usage)


def test_responses_stream_helper_is_counted_once_with_exact_usage(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    responses_stream_helper = surface(client, "responses.stream")
    with RunGuard() as guard, responses_stream_helper(model=MODEL, input="hi") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert [r.path for r in fake.requests] == ["/v1/responses"]
    assert final.output_text == REPLY.text
    assert_exact(guard.usage)


async def test_async_responses_stream_helper_is_counted_once_with_exact_usage(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    responses_stream_helper = surface(aclient, "responses.stream")
    with RunGuard() as guard:
        async with responses_stream_helper(model=MODEL, input="hi") as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
    assert fake.wire_count == 1
    assert final.usage is not None
    assert_exact(guard.usage)


def test_legacy_completion_stream_is_counted_once(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with RunGuard() as guard:
        pieces = list(
            client.completions.create(
                model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=20, stream=True
            )
        )
    assert "".join(p.choices[0].text for p in pieces) == REPLY.text
    assert fake.wire_count == 1
    usage = guard.usage
    assert usage.calls == 1
    # exact if RunGuard asked for usage, else charged the request's cap as an estimate
    if usage.estimated_calls:
        assert usage.output_tokens == 20
    else:
        assert usage.output_tokens == REPLY.output_tokens


def test_raw_streaming_response_bytes_are_left_alone(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, stream=True
    ) as response:
        unguarded = list(response.iter_lines())
    with RunGuard() as guard:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, stream=True, max_tokens=CAP
        ) as response:
            lines = list(response.iter_lines())
        del response
        gc.collect()
    assert "stream_options" not in fake.requests[1].body
    assert len(lines) == len(unguarded)
    assert guard.usage.calls == 1
    assert guard.usage.estimated_calls == 1


# -- abandoned streams ---------------------------------------------------------------
# The outer guard leaves room for exactly two capped calls (and three calls).
# Once the abandoned stream is settled at its cap, one more capped call fits
# and the one after is refused by the token ceiling, with an observed value
# that shows no reservation was left behind (a leaked call reservation would
# trip max_calls instead).


def assert_abandoned(inner: RunGuard, outer: RunGuard, input_tokens: int | None = None) -> None:
    for usage in (inner.usage, outer.usage):
        assert usage.calls == 1
        assert usage.estimated_calls == 1
        assert usage.output_tokens == CAP
        if input_tokens is not None:
            assert usage.input_tokens == input_tokens


def assert_budget_left_is_exact(create: Callable[..., Any], fake: FakeProvider) -> None:
    sent = fake.wire_count
    create(max_tokens=CAP)  # CAP spent + CAP asked == the outer limit
    with pytest.raises(BudgetExceeded) as info:
        create(max_tokens=CAP)
    assert info.value.trip.guard == "max_output_tokens"
    assert info.value.trip.observed == CAP + REPLY.output_tokens + CAP
    assert fake.wire_count == sent + 1


async def assert_budget_left_is_exact_async(create: Callable[..., Any], fake: FakeProvider) -> None:
    sent = fake.wire_count
    await create(max_tokens=CAP)
    with pytest.raises(BudgetExceeded) as info:
        await create(max_tokens=CAP)
    assert info.value.trip.guard == "max_output_tokens"
    assert info.value.trip.observed == CAP + REPLY.output_tokens + CAP
    assert fake.wire_count == sent + 1


def guards() -> tuple[RunGuard, RunGuard]:
    outer = RunGuard(max_calls=3, max_output_tokens=2 * CAP, name="outer", raise_on_exit=False)
    inner = RunGuard(name="inner", raise_on_exit=False)
    return outer, inner


def _chat_create(client: Any) -> Callable[..., Any]:
    def create(**kwargs: Any) -> Any:
        return client.chat.completions.create(model=MODEL, messages=MESSAGES, **kwargs)

    return create


def test_abandoned_chat_stream_is_settled_on_close(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = chat_stream(client, max_tokens=CAP)
        for _ in stream:
            break
        stream.close()
        assert_abandoned(inner, outer)
        assert_budget_left_is_exact(_chat_create(client), fake)


def test_abandoned_chat_stream_is_settled_when_its_with_block_ends(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        with chat_stream(client, max_tokens=CAP) as stream:
            for _ in stream:
                break
        assert_abandoned(inner, outer)
        assert_budget_left_is_exact(_chat_create(client), fake)


def test_abandoned_chat_stream_is_settled_when_collected(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = chat_stream(client, max_tokens=CAP)
        for _ in stream:
            break
        del stream
        gc.collect()
        assert_abandoned(inner, outer)
        assert_budget_left_is_exact(_chat_create(client), fake)


# A garbage-collection pass can start at any allocation, including inside the ledger's
# lock (building a usage snapshot, a trip, a guard's own settled()). When it frees an
# abandoned stream there, that stream's settlement must not wait for the lock its own
# thread holds. Run apart: a regression would hang the process, not fail an assertion.
COLLECTED_UNDER_THE_LOCK = """
import gc, json
from runguard import RunGuard
from runguard.testing import FakeProvider, Reply

class CollectsOnce:
    # a collection that starts inside the ledger's lock, where a real one may start
    name, needs_price, armed = "collects", False, False
    def admit(self, request, account):
        return None
    def settled(self, request, result, account):
        if CollectsOnce.armed:
            CollectsOnce.armed = False
            gc.collect()
        return None

fake = FakeProvider(default=Reply(input_tokens=31, output_tokens=7))
client = fake.openai(max_retries=0)
ask = dict(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
gc.disable()  # the abandoned stream (held in a cycle) waits for that collection
with RunGuard(guards=[CollectsOnce()]) as guard:
    stream = client.chat.completions.create(stream=True, **ask)
    for _ in stream:
        break
    del stream, _
    CollectsOnce.armed = True
    client.chat.completions.create(**ask)
usage = guard.usage
print(json.dumps({"calls": usage.calls, "estimated": usage.estimated_calls,
                  "output": usage.output_tokens, "wire": fake.wire_count}))
"""


def test_a_stream_collected_inside_the_ledgers_lock_is_settled_without_deadlock() -> None:
    done = run("-c", COLLECTED_UNDER_THE_LOCK, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # both calls sent and settled by the time the guard exited: the abandoned stream
    # charged its cap (no usage arrived), the second call its real output
    assert seen == {"calls": 2, "estimated": 1, "output": CAP + REPLY.output_tokens, "wire": 2}


def test_chat_stream_never_iterated_is_settled_when_collected(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = chat_stream(client, max_tokens=CAP)
        del stream
        gc.collect()
        assert_abandoned(inner, outer)
        assert_budget_left_is_exact(_chat_create(client), fake)


def test_abandoned_chat_stream_helper_is_settled_when_its_with_block_ends(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    chat_stream_helper = chat_helper(client)
    outer, inner = guards()
    with outer, inner:
        with chat_stream_helper(model=MODEL, messages=MESSAGES, max_tokens=CAP) as stream:
            for _ in stream:
                break
        assert_abandoned(inner, outer)
        assert_budget_left_is_exact(_chat_create(client), fake)


def test_abandoned_responses_stream_helper_is_settled_when_its_with_block_ends(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    responses_stream_helper = surface(client, "responses.stream")
    outer, inner = guards()
    with outer, inner:
        with responses_stream_helper(model=MODEL, input="hi", max_output_tokens=CAP) as stream:
            for _ in stream:
                break
        assert_abandoned(inner, outer)
        assert_budget_left_is_exact(_chat_create(client), fake)


async def settle_collected(guard: RunGuard, rounds: int = 20) -> None:
    """Let the loop run the finalizers of collected async generators."""
    for _ in range(rounds):
        gc.collect()
        if guard.usage.calls:
            return
        await asyncio.sleep(0)


async def test_async_abandoned_chat_stream_is_settled_on_close(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = await chat_stream(aclient, max_tokens=CAP)
        async for _ in stream:
            break
        await stream.close()
        assert_abandoned(inner, outer)
        await assert_budget_left_is_exact_async(_chat_create(aclient), fake)


async def test_async_abandoned_chat_stream_is_settled_when_its_with_block_ends(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        async with await chat_stream(aclient, max_tokens=CAP) as stream:
            async for _ in stream:
                break
        assert_abandoned(inner, outer)
        await assert_budget_left_is_exact_async(_chat_create(aclient), fake)


async def test_async_abandoned_chat_stream_is_settled_when_collected(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = await chat_stream(aclient, max_tokens=CAP)
        async for _ in stream:
            break
        del stream
        await settle_collected(inner)
        assert_abandoned(inner, outer)
        await assert_budget_left_is_exact_async(_chat_create(aclient), fake)


async def test_async_chat_stream_never_iterated_is_settled_when_collected(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = await chat_stream(aclient, max_tokens=CAP)
        del stream
        await settle_collected(inner)
        assert_abandoned(inner, outer)
        await assert_budget_left_is_exact_async(_chat_create(aclient), fake)


# -- abandoned Anthropic streams -----------------------------------------------------
# message_start already reported the input tokens; only the output is estimated.


def _claude_create(client: Any) -> Callable[..., Any]:
    def create(**kwargs: Any) -> Any:
        return client.messages.create(model=CLAUDE, messages=MESSAGES, **kwargs)

    return create


def test_abandoned_anthropic_stream_is_settled_on_close(
    fake: FakeProvider, claude: anthropic.Anthropic
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = claude.messages.create(
            model=CLAUDE, messages=MESSAGES, max_tokens=CAP, stream=True
        )
        for _ in stream:
            break
        stream.close()
        assert_abandoned(inner, outer, input_tokens=REPLY.input_tokens)
        assert_budget_left_is_exact(_claude_create(claude), fake)


def test_abandoned_anthropic_stream_helper_is_settled_when_its_with_block_ends(
    fake: FakeProvider, claude: anthropic.Anthropic
) -> None:
    outer, inner = guards()
    with outer, inner:
        with claude.messages.stream(model=CLAUDE, messages=MESSAGES, max_tokens=CAP) as stream:
            for _ in stream.text_stream:
                break
        assert_abandoned(inner, outer, input_tokens=REPLY.input_tokens)
        assert_budget_left_is_exact(_claude_create(claude), fake)


def test_abandoned_anthropic_stream_is_settled_when_collected(
    fake: FakeProvider, claude: anthropic.Anthropic
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = claude.messages.create(
            model=CLAUDE, messages=MESSAGES, max_tokens=CAP, stream=True
        )
        for _ in stream:
            break
        del stream
        gc.collect()
        assert_abandoned(inner, outer, input_tokens=REPLY.input_tokens)
        assert_budget_left_is_exact(_claude_create(claude), fake)


async def test_async_abandoned_anthropic_stream_is_settled_on_close(
    fake: FakeProvider, aclaude: anthropic.AsyncAnthropic
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = await aclaude.messages.create(
            model=CLAUDE, messages=MESSAGES, max_tokens=CAP, stream=True
        )
        async for _ in stream:
            break
        await stream.close()
        assert_abandoned(inner, outer, input_tokens=REPLY.input_tokens)
        await assert_budget_left_is_exact_async(_claude_create(aclaude), fake)


async def test_async_anthropic_stream_never_iterated_is_settled_when_collected(
    fake: FakeProvider, aclaude: anthropic.AsyncAnthropic
) -> None:
    outer, inner = guards()
    with outer, inner:
        stream = await aclaude.messages.create(
            model=CLAUDE, messages=MESSAGES, max_tokens=CAP, stream=True
        )
        del stream
        await settle_collected(inner)
        assert_abandoned(inner, outer)
        await assert_budget_left_is_exact_async(_claude_create(aclaude), fake)
