"""RunGuard over the real ``openai`` SDK, talking to ``runguard.testing.FakeProvider``.

Ground truth is what reached the fake wire (``fake.requests``) and the usage
numbers the scripted :class:`Reply` sent back; dollars are checked against
``genai_prices.calc_price`` directly, never against numbers typed in here.
Stream-specific behaviour (usage injection, abandoned streams) lives in
``test_streams.py``.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import genai_prices
import openai
import pydantic
import pytest

import runguard
from _sdk import accepts, chat_helper, has, surface
from _stand_in import write_stand_in
from runguard import BudgetExceeded, GuardTripped, Price, RunGuard, UnknownModelPrice
from runguard.pricing import dollars
from runguard.providers import _stainless, missing_hooks
from runguard.providers import openai as openai_adapter
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o"
LEGACY_MODEL = "gpt-3.5-turbo-instruct"
EMBED_MODEL = "text-embedding-3-small"
MESSAGES = [{"role": "user", "content": "Say hello as JSON"}]
# JSON text, so that the same reply serves plain calls and structured parsing.
REPLY = Reply(text='{"answer": "hello"}', input_tokens=31, output_tokens=7)


class Answer(pydantic.BaseModel):
    answer: str


# -- helpers ---------------------------------------------------------------------


def catalogue_price(model: str, provider: str = "openai", **tokens: int) -> float:
    """The price genai-prices itself gives for these tokens (the reference for cost_usd)."""
    usage = genai_prices.Usage(**tokens)
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


def assert_exact(
    usage: runguard.Usage,
    reply: Reply,
    model: str,
    *,
    output_tokens: int | None = None,
) -> None:
    """One call, charged exactly what ``reply`` reported, priced as genai-prices prices it."""
    out = reply.output_tokens if output_tokens is None else output_tokens
    assert usage.calls == 1
    assert usage.input_tokens == reply.input_tokens
    assert usage.output_tokens == out
    assert usage.cache_read_tokens == reply.cache_read_tokens
    assert usage.estimated_calls == 0
    assert usage.unpriced_calls == 0
    expected = catalogue_price(
        model,
        input_tokens=reply.input_tokens,
        output_tokens=out,
        cache_read_tokens=reply.cache_read_tokens,
    )
    assert usage.cost_usd == pytest.approx(expected)


def assert_exact_or_capped(usage: runguard.Usage, cap: int) -> None:
    """One call whose usage RunGuard either read from the body or estimated at the cap."""
    assert usage.calls == 1
    if usage.estimated_calls:
        assert usage.estimated_calls == 1
        assert usage.output_tokens == cap
    else:
        assert (usage.input_tokens, usage.output_tokens) == (
            REPLY.input_tokens,
            REPLY.output_tokens,
        )


def input_estimate(client: Any, **request: Any) -> int:
    """RunGuard's pre-call input estimate for ``request``, read from a refusal's trip.

    Under ``max_input_tokens=1`` any request is refused and the trip's
    ``observed`` is exactly the estimate (nothing spent, nothing reserved).
    """
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_input_tokens=1):
        client.chat.completions.create(**request)
    assert info.value.trip.guard == "max_input_tokens"
    return int(info.value.trip.observed)


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=REPLY)


@pytest.fixture
def client(fake: FakeProvider) -> openai.OpenAI:
    return fake.openai(max_retries=0)


@pytest.fixture
def aclient(fake: FakeProvider) -> openai.AsyncOpenAI:
    return fake.async_openai(max_retries=0)


# -- every non-streaming surface, sync and async ------------------------------------
# Each callable returns the SDK result (sync client) or its coroutine (async client).


def _chat_create(c: Any) -> Any:
    return c.chat.completions.create(model=MODEL, messages=MESSAGES)


def _chat_parse(c: Any) -> Any:
    parse = surface(c, "chat.completions.parse")
    return parse(model=MODEL, messages=MESSAGES, response_format=Answer)


def _responses_create(c: Any) -> Any:
    return surface(c, "responses").create(model=MODEL, input="Say hello as JSON")


def _responses_parse(c: Any) -> Any:
    parse = surface(c, "responses.parse")
    return parse(model=MODEL, input="Say hello as JSON", text_format=Answer)


def _legacy_completion(c: Any) -> Any:
    return c.completions.create(model=LEGACY_MODEL, prompt="Say hello as JSON")


def _embedding(c: Any) -> Any:
    return c.embeddings.create(model=EMBED_MODEL, input="Say hello as JSON")


# (call, wire path, model priced, output tokens the wire reports: embeddings report none)
PLAIN_SURFACES = [
    pytest.param(_chat_create, "/v1/chat/completions", MODEL, 7, id="chat.completions.create"),
    pytest.param(_chat_parse, "/v1/chat/completions", MODEL, 7, id="chat.completions.parse"),
    pytest.param(_responses_create, "/v1/responses", MODEL, 7, id="responses.create"),
    pytest.param(_responses_parse, "/v1/responses", MODEL, 7, id="responses.parse"),
    pytest.param(_legacy_completion, "/v1/completions", LEGACY_MODEL, 7, id="completions.create"),
    pytest.param(_embedding, "/v1/embeddings", EMBED_MODEL, 0, id="embeddings.create"),
]


@pytest.mark.parametrize(("call", "path", "model", "output_tokens"), PLAIN_SURFACES)
def test_sync_surface_is_counted_once_with_exact_usage(
    fake: FakeProvider,
    client: openai.OpenAI,
    call: Callable[[Any], Any],
    path: str,
    model: str,
    output_tokens: int,
) -> None:
    with RunGuard() as guard:
        call(client)
    assert [r.path for r in fake.requests] == [path]
    assert_exact(guard.usage, REPLY, model, output_tokens=output_tokens)


@pytest.mark.parametrize(("call", "path", "model", "output_tokens"), PLAIN_SURFACES)
async def test_async_surface_is_counted_once_with_exact_usage(
    fake: FakeProvider,
    aclient: openai.AsyncOpenAI,
    call: Callable[[Any], Any],
    path: str,
    model: str,
    output_tokens: int,
) -> None:
    with RunGuard() as guard:
        await call(aclient)
    assert [r.path for r in fake.requests] == [path]
    assert_exact(guard.usage, REPLY, model, output_tokens=output_tokens)


def test_parse_still_returns_the_parsed_model(client: openai.OpenAI) -> None:
    chat_parse = surface(client, "chat.completions.parse")
    responses_parse = surface(client, "responses.parse")
    with RunGuard():
        completion = chat_parse(model=MODEL, messages=MESSAGES, response_format=Answer)
        response = responses_parse(model=MODEL, input="hi", text_format=Answer)
    assert completion.choices[0].message.parsed == Answer(answer="hello")
    assert response.output_parsed == Answer(answer="hello")


def test_beta_chat_completions_is_counted_once(fake: FakeProvider, client: openai.OpenAI) -> None:
    parse = surface(client, "beta.chat.completions.parse")
    sent = 0
    with RunGuard() as guard:
        if has(client, "beta.chat.completions.create"):  # some SDKs' beta chat only parses
            client.beta.chat.completions.create(model=MODEL, messages=MESSAGES)
            sent += 1
        parse(model=MODEL, messages=MESSAGES, response_format=Answer)
        sent += 1
    assert fake.count("/chat/completions") == fake.wire_count == sent
    assert guard.usage.calls == sent
    assert guard.usage.input_tokens == sent * REPLY.input_tokens
    assert guard.usage.output_tokens == sent * REPLY.output_tokens
    assert guard.usage.estimated_calls == 0


async def test_beta_responses_is_counted_once(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    beta_responses = surface(aclient, "beta.responses")
    with RunGuard() as guard:
        await beta_responses.create(model=MODEL, input="hi")
    assert [r.path for r in fake.requests] == ["/v1/responses"]
    assert_exact(guard.usage, REPLY, MODEL)


# -- with_raw_response / with_streaming_response ------------------------------------


def test_raw_response_never_parsed_is_still_counted(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with RunGuard() as guard:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        usage = guard.usage  # read before anything touches the parsed body
    assert raw.http_response.status_code == 200
    assert fake.wire_count == 1
    assert_exact(usage, REPLY, MODEL)


def test_raw_response_parsed_twice_is_counted_once(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with RunGuard() as guard:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        first = raw.parse()
        second = raw.parse()
    assert first.usage is not None and second.usage is not None
    assert fake.wire_count == 1
    assert_exact(guard.usage, REPLY, MODEL)


async def test_async_raw_response_parsed_or_not_is_counted_once_each(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    responses = surface(aclient, "responses")
    with RunGuard() as guard:
        await aclient.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
        raw = await responses.with_raw_response.create(model=MODEL, input="hi")
        # the legacy raw wrapper parses synchronously, even on the async client
        raw.parse()
        raw.parse()
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/v1/responses"]
    assert guard.usage.calls == 2
    assert guard.usage.input_tokens == 2 * REPLY.input_tokens
    assert guard.usage.output_tokens == 2 * REPLY.output_tokens
    assert guard.usage.estimated_calls == 0


def test_streaming_response_parse_is_counted_once(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with RunGuard() as guard:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES
        ) as response:
            completion = response.parse()
            completion_again = response.parse()
        usage = guard.usage
    assert completion.usage is not None and completion_again.usage is not None
    assert fake.wire_count == 1
    assert_exact(usage, REPLY, MODEL)


async def test_async_streaming_response_parse_is_counted_once(
    fake: FakeProvider, aclient: openai.AsyncOpenAI
) -> None:
    with RunGuard() as guard:
        async with aclient.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES
        ) as response:
            await response.parse()
        usage = guard.usage
    assert fake.wire_count == 1
    assert_exact(usage, REPLY, MODEL)


@pytest.mark.parametrize("read", ["read", "json", "text"])
def test_streaming_response_read_whole_but_not_parsed_is_exact_when_closed(
    fake: FakeProvider, client: openai.OpenAI, read: str
) -> None:
    # The caller reads the body whole without the SDK's parse: the usage is in
    # the bytes the caller holds, so closing the block settles it exactly.
    with RunGuard() as guard:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=50
        ) as response:
            getattr(response, read)()
        assert guard._account.reserved_calls == 0
        usage = guard.usage
    assert fake.wire_count == 1
    assert_exact(usage, REPLY, MODEL)


LONG = Reply(text="x" * 4000, input_tokens=31, output_tokens=7)  # a body of many pieces


def assert_abandoned_at_the_block_end(guard: RunGuard, fake: FakeProvider) -> None:
    # settled when the block ended, not later: the worst case of what it never showed
    usage = guard.usage
    assert (usage.calls, usage.estimated_calls, usage.output_tokens) == (1, 1, 50)
    assert guard._account.reserved_calls == 0
    assert fake.wire_count == 1


@pytest.mark.parametrize("keep", [False, True], ids=["break", "iterator-kept"])
def test_streaming_response_read_in_part_is_settled_when_its_block_ends(
    fake: FakeProvider, client: openai.OpenAI, keep: bool
) -> None:
    fake.default = LONG
    with RunGuard() as guard:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=50
        ) as response:
            pieces = response.iter_bytes(chunk_size=100)
            next(pieces)
            if not keep:
                del pieces
        assert_abandoned_at_the_block_end(guard, fake)


@pytest.mark.parametrize("read", ["iter_bytes", "iter_text", "iter_lines", "kept"])
async def test_async_streaming_response_read_in_part_is_settled_when_its_block_ends(
    fake: FakeProvider, aclient: openai.AsyncOpenAI, read: str
) -> None:
    fake.default = LONG
    with RunGuard() as guard:
        async with aclient.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=50
        ) as response:
            if read == "kept":
                pieces = response.iter_bytes(chunk_size=100)
                await pieces.__anext__()
            else:
                async for _ in getattr(response, read)():
                    break
        assert_abandoned_at_the_block_end(guard, fake)


def test_streaming_response_read_with_iter_lines_is_counted_once(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    # The caller reads bytes, never the parsed body: RunGuard may not see the
    # usage, and then charges the request's own output cap, flagged as estimated.
    with RunGuard() as guard:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=50
        ) as response:
            lines = list(response.iter_lines())
        del response  # at the latest, the call settles when the response is collected
        usage = guard.usage
    assert any('"usage"' in line for line in lines)
    assert fake.wire_count == 1
    assert_exact_or_capped(usage, cap=50)


def test_streaming_response_is_settled_when_its_block_closes(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    # The response is closed (its `with` block ended) but the caller still
    # holds it: the call is over and must not stay reserved in the guard.
    with RunGuard() as guard:
        with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=50
        ) as response:
            list(response.iter_lines())
        assert response.http_response.is_closed
        usage = guard.usage
    assert fake.wire_count == 1
    assert_exact_or_capped(usage, cap=50)


# -- Azure ---------------------------------------------------------------------------


def test_azure_call_is_counted_and_priced_through_an_alias(fake: FakeProvider) -> None:
    azure = fake.azure_openai(max_retries=0)
    with RunGuard(max_cost_usd=1.0, prices={"my-deployment": MODEL}) as guard:
        azure.chat.completions.create(model="my-deployment", messages=MESSAGES)
    assert [r.path for r in fake.requests] == ["/openai/deployments/my-deployment/chat/completions"]
    assert_exact(guard.usage, REPLY, MODEL)


def test_azure_deployment_without_a_price_is_unpriced(fake: FakeProvider) -> None:
    azure = fake.azure_openai(max_retries=0)
    with RunGuard(max_calls=5) as guard:
        azure.chat.completions.create(model="my-deployment", messages=MESSAGES)
    assert fake.count("/openai/deployments/my-deployment/chat/completions") == 1
    usage = guard.usage
    assert usage.calls == 1
    assert usage.unpriced_calls == 1
    assert usage.cost_usd == 0.0
    assert (usage.input_tokens, usage.output_tokens) == (REPLY.input_tokens, REPLY.output_tokens)


def test_azure_deployment_without_a_price_is_refused_under_a_dollar_ceiling(
    fake: FakeProvider,
) -> None:
    azure = fake.azure_openai(max_retries=0)
    with pytest.raises(UnknownModelPrice), RunGuard(max_cost_usd=1.0):
        azure.chat.completions.create(model="my-deployment", messages=MESSAGES)
    assert fake.wire_count == 0


# -- pricing -------------------------------------------------------------------------


def test_cached_input_tokens_are_priced_as_genai_prices_prices_them(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    reply = Reply(input_tokens=1000, cache_read_tokens=800, output_tokens=100)
    fake.script(reply)
    with RunGuard() as guard:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert guard.usage.cache_read_tokens == 800
    assert_exact(guard.usage, reply, MODEL)
    # the cache discount is real: the same tokens uncached cost more
    uncached = catalogue_price(MODEL, input_tokens=1000, output_tokens=100)
    assert guard.usage.cost_usd < uncached


def test_cost_uses_the_model_the_response_names(fake: FakeProvider, client: openai.OpenAI) -> None:
    fake.script(Reply(model="gpt-4o-mini", input_tokens=500, output_tokens=200))
    with RunGuard() as guard:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake.requests[0].model == MODEL
    mini = catalogue_price("gpt-4o-mini", input_tokens=500, output_tokens=200)
    full = catalogue_price(MODEL, input_tokens=500, output_tokens=200)
    assert mini != pytest.approx(full)
    assert guard.usage.cost_usd == pytest.approx(mini)


def test_response_without_usage_is_charged_the_reservation_as_estimated(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    fake.script(Reply(usage=False))
    estimate = input_estimate(client, model=MODEL, messages=MESSAGES, max_tokens=64)
    with RunGuard() as guard:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64)
    usage = guard.usage
    assert fake.wire_count == 1
    assert usage.calls == 1
    assert usage.estimated_calls == 1
    assert usage.input_tokens == estimate
    assert usage.output_tokens == 64
    assert usage.cost_usd == pytest.approx(
        catalogue_price(MODEL, input_tokens=estimate, output_tokens=64)
    )


# -- unknown models ------------------------------------------------------------------


def test_unknown_model_under_a_dollar_ceiling_is_refused_before_sending(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with pytest.raises(UnknownModelPrice) as info, RunGuard(max_cost_usd=1.0):
        client.chat.completions.create(model="my-model", messages=MESSAGES)
    assert fake.wire_count == 0
    message = str(info.value)
    assert "'my-model'" in message
    assert "prices=" in message
    assert "runguard.Price(" in message
    assert info.value.model == "my-model"


def test_unknown_model_without_a_dollar_ceiling_goes_through_unpriced(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with RunGuard(max_calls=3) as guard:
        client.chat.completions.create(model="my-model", messages=MESSAGES)
    assert fake.wire_count == 1
    usage = guard.usage
    assert usage.calls == 1
    assert usage.unpriced_calls == 1
    assert usage.cost_usd == 0.0
    assert (usage.input_tokens, usage.output_tokens) == (REPLY.input_tokens, REPLY.output_tokens)


def test_unknown_model_with_a_supplied_price_is_priced_exactly(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    prices = {"my-model": Price(input=1.0, output=2.0)}
    with RunGuard(max_cost_usd=1.0, prices=prices) as guard:
        client.chat.completions.create(model="my-model", messages=MESSAGES)
    assert fake.wire_count == 1
    usage = guard.usage
    assert usage.unpriced_calls == 0
    expected = (REPLY.input_tokens * 1.0 + REPLY.output_tokens * 2.0) / 1_000_000
    assert usage.cost_usd == pytest.approx(expected)


# -- refusals ------------------------------------------------------------------------


def test_output_ceiling_refuses_before_sending(fake: FakeProvider, client: openai.OpenAI) -> None:
    with (
        RunGuard(max_output_tokens=100, name="agent-7", raise_on_exit=False) as guard,
        pytest.raises(BudgetExceeded) as info,
    ):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200)
    assert fake.wire_count == 0
    trip = info.value.trip
    assert trip is guard.trip
    assert (trip.guard, trip.limit, trip.observed, trip.run) == (
        "max_output_tokens",
        100,
        200,
        "agent-7",
    )
    message = str(info.value)
    for part in ("max_output_tokens", "100", "200", "agent-7"):
        assert part in message
    assert info.value.usage == guard.usage
    assert guard.usage.calls == 0


def test_output_reservation_is_the_cap_times_n(fake: FakeProvider, client: openai.OpenAI) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_output_tokens=250):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100, n=3)
    assert fake.wire_count == 0
    assert info.value.trip.observed == 300


def test_max_completion_tokens_is_the_cap(fake: FakeProvider, client: openai.OpenAI) -> None:
    create = accepts(client.chat.completions.create, "max_completion_tokens")
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_output_tokens=250):
        create(model=MODEL, messages=MESSAGES, max_completion_tokens=260)
    assert fake.wire_count == 0
    assert info.value.trip.observed == 260


def test_responses_max_output_tokens_is_the_cap(fake: FakeProvider, client: openai.OpenAI) -> None:
    responses = surface(client, "responses")
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_output_tokens=250):
        responses.create(model=MODEL, input="hi", max_output_tokens=300)
    assert fake.wire_count == 0
    assert info.value.trip.observed == 300


def test_uncapped_chat_call_reserves_4096_output_tokens(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_output_tokens=4095):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake.wire_count == 0
    assert info.value.trip.observed == 4096
    with RunGuard(max_output_tokens=4096) as guard:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake.wire_count == 1
    assert guard.usage.calls == 1


def test_uncapped_legacy_completion_reserves_16_output_tokens(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_output_tokens=15):
        client.completions.create(model=LEGACY_MODEL, prompt="hi")
    assert fake.wire_count == 0
    assert info.value.trip.observed == 16
    with RunGuard(max_output_tokens=16) as guard:
        client.completions.create(model=LEGACY_MODEL, prompt="hi")
    assert fake.count("/completions") == 1
    assert guard.usage.calls == 1


def test_input_ceiling_refuses_before_sending(fake: FakeProvider, client: openai.OpenAI) -> None:
    long_prompt = [{"role": "user", "content": "word " * 200}]
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_input_tokens=50):
        client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=5)
    assert fake.wire_count == 0
    trip = info.value.trip
    assert trip.guard == "max_input_tokens"
    assert trip.limit == 50
    assert trip.observed > 50
    message = str(info.value)
    assert "max_input_tokens" in message
    assert "50" in message
    assert f"{int(trip.observed):,}" in message


def test_total_ceiling_counts_estimated_input_plus_output_cap(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 90}
    estimate = input_estimate(client, **request)
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_total_tokens=90):
        client.chat.completions.create(**request)
    assert fake.wire_count == 0
    trip = info.value.trip
    assert (trip.guard, trip.limit) == ("max_total_tokens", 90)
    assert trip.observed == estimate + 90
    message = str(info.value)
    assert "max_total_tokens" in message
    assert f"{estimate + 90:,}" in message


def test_dollar_ceiling_refuses_the_worst_case_before_sending(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1000}
    estimate = input_estimate(client, **request)
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_cost_usd=0.005):
        client.chat.completions.create(**request)
    assert fake.wire_count == 0
    trip = info.value.trip
    worst = catalogue_price(MODEL, input_tokens=estimate, output_tokens=1000)
    assert (trip.guard, trip.limit) == ("max_cost_usd", 0.005)
    assert trip.observed == pytest.approx(worst)
    message = str(info.value)
    assert "max_cost_usd" in message
    assert "over the limit of $0.005 " in message
    assert dollars(worst) in message


def test_call_that_fits_is_admitted_and_the_next_one_that_does_not_is_refused(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_output_tokens=100) as guard:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=60)
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=94)
    # the first call spent REPLY.output_tokens (7), so 7 + 94 > 100
    assert fake.wire_count == 1
    assert info.value.trip.observed == REPLY.output_tokens + 94
    assert guard.usage.calls == 1


def test_real_usage_over_the_ceiling_latches_the_guard(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    # The input estimate of a short prompt falls far short of what the provider reports.
    fake.script(Reply(input_tokens=400, output_tokens=3))
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_input_tokens=300) as guard:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
        assert guard.tripped
        with pytest.raises(BudgetExceeded):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    # raise_on_exit: the swallowed refusal surfaces when the block ends
    assert info.value.trip.guard == "max_input_tokens"
    assert info.value.trip.observed == 400
    assert fake.wire_count == 1
    assert guard.usage.calls == 1


async def test_tripped_guard_refuses_everything_at_once(
    fake: FakeProvider, client: openai.OpenAI, aclient: openai.AsyncOpenAI
) -> None:
    with RunGuard(max_output_tokens=100, raise_on_exit=False) as guard:
        with pytest.raises(BudgetExceeded) as first:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200)
        refused: list[BudgetExceeded] = []
        attempts: list[Callable[[], Any]] = [
            lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1),
            lambda: client.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=1, stream=True
            ),
        ]
        if has(client, "responses"):  # only the calls this SDK can make
            attempts.append(
                lambda: client.responses.create(model=MODEL, input="hi", max_output_tokens=1)
            )
        attempts.append(lambda: client.embeddings.create(model=EMBED_MODEL, input="hi"))
        for attempt in attempts:
            with pytest.raises(BudgetExceeded) as info:
                attempt()
            refused.append(info.value)
        with pytest.raises(BudgetExceeded) as info:
            await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        refused.append(info.value)
        if has(aclient, "chat.completions.stream") or has(aclient, "beta.chat.completions.stream"):
            with pytest.raises(BudgetExceeded) as info:
                async with chat_helper(aclient)(model=MODEL, messages=MESSAGES, max_tokens=1):
                    pass
            refused.append(info.value)
    assert fake.wire_count == 0
    assert all(exc.trip == first.value.trip for exc in refused)
    assert guard.usage.calls == 0


# -- failed calls --------------------------------------------------------------------


def test_failed_call_counts_one_call_and_releases_its_reservation(fake: FakeProvider) -> None:
    client = fake.openai(max_retries=0)
    fake.script(Reply(status=500))
    with RunGuard(max_output_tokens=150) as guard:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
        failed = guard.usage
        # had the first 100 stayed reserved, 100 + 100 > 150 would be refused
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    assert fake.wire_count == 2
    assert failed.calls == 1
    assert (failed.input_tokens, failed.output_tokens, failed.cost_usd) == (0, 0, 0.0)
    assert failed.estimated_calls == 0
    assert guard.usage.calls == 2
    assert guard.usage.output_tokens == REPLY.output_tokens


async def test_async_failed_call_counts_one_call_and_releases_its_reservation(
    fake: FakeProvider,
) -> None:
    client = fake.async_openai(max_retries=0)
    fake.script(Reply(status=500))
    with RunGuard(max_output_tokens=150) as guard:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
        failed = guard.usage
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    assert fake.wire_count == 2
    assert (failed.calls, failed.input_tokens, failed.output_tokens) == (1, 0, 0)
    assert guard.usage.calls == 2


def test_sdk_retries_are_one_logical_call(fake: FakeProvider) -> None:
    client = fake.openai(max_retries=2)
    fake.script(Reply(status=429), Reply(input_tokens=11, output_tokens=3))
    with RunGuard(max_calls=1) as guard:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake.wire_count == 2
    assert guard.usage.calls == 1
    assert (guard.usage.input_tokens, guard.usage.output_tokens) == (11, 3)


# -- non-billable calls --------------------------------------------------------------


def test_non_billable_calls_pass_a_tripped_guard_uncounted(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with RunGuard(max_output_tokens=10, raise_on_exit=False) as guard:
        with pytest.raises(BudgetExceeded):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
        assert guard.tripped
        client.models.list()
        expected = [("GET", "/v1/models")]
        if has(client, "responses.input_tokens.count"):  # only if this SDK can count them
            client.responses.input_tokens.count(model=MODEL, input="hi")
            expected.append(("POST", "/v1/responses/input_tokens"))
        # embeddings are billable: refused like any LLM call
        with pytest.raises(BudgetExceeded):
            client.embeddings.create(model=EMBED_MODEL, input="hi")
    assert [(r.method, r.path) for r in fake.requests] == expected
    assert guard.usage.calls == 0


# -- exceptions ----------------------------------------------------------------------


def test_budget_exceeded_is_not_an_sdk_error() -> None:
    assert issubclass(BudgetExceeded, GuardTripped)
    for sdk_error in (
        openai.OpenAIError,
        openai.APIError,
        openai.APIConnectionError,
        openai.RateLimitError,
        anthropic.AnthropicError,
        anthropic.APIConnectionError,
    ):
        assert not issubclass(BudgetExceeded, sdk_error), sdk_error
        assert not issubclass(UnknownModelPrice, sdk_error), sdk_error


RETRYABLE_WORDS = ("429", "rate limit")


@pytest.mark.parametrize(
    ("settings", "max_tokens"),
    [
        pytest.param({"max_output_tokens": 100}, 200, id="output"),
        pytest.param({"max_calls": 1}, 5, id="calls"),
        pytest.param({"max_cost_usd": 0.001}, 1000, id="cost"),
    ],
)
def test_refusal_message_does_not_look_retryable(
    client: openai.OpenAI, settings: dict[str, Any], max_tokens: int
) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(**settings):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens)
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens)
    message = str(info.value).lower()
    assert not any(word in message for word in RETRYABLE_WORDS), message


@pytest.mark.parametrize(
    ("settings", "max_tokens"),
    [
        pytest.param({"max_output_tokens": 429}, 500, id="limit-429"),
        pytest.param({"max_output_tokens": 1000}, 1429, id="observed-1429"),
        pytest.param({"max_cost_usd": 0.01}, 4290, id="observed-cost-0.0429"),
    ],
)
def test_refusal_message_does_not_look_retryable_whatever_the_numbers(
    fake: FakeProvider, client: openai.OpenAI, settings: dict[str, Any], max_tokens: int
) -> None:
    # MLflow's harness retries any exception whose str() contains "429"; the
    # numbers RunGuard puts in its message must not spell it by accident.
    with pytest.raises(BudgetExceeded) as info, RunGuard(**settings):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=max_tokens)
    assert fake.wire_count == 0
    message = str(info.value).lower()
    assert not any(word in message for word in RETRYABLE_WORDS), message


def test_refusal_message_defuses_retryable_words_in_the_guard_name(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_calls=1, name="Rate Limit 429 bot"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert fake.wire_count == 1
    message = str(info.value)
    assert not any(word in message.lower() for word in RETRYABLE_WORDS), message
    assert info.value.trip.run == "Rate Limit 429 bot"  # the record keeps the exact name
    printable = message.replace("\u2060", "").replace("\u00a0", " ")
    assert "Rate Limit 429 bot" in printable


# -- instrumentation -----------------------------------------------------------------


def test_installed_openai_has_every_hook_point() -> None:
    assert missing_hooks("openai") == []


@pytest.fixture
def broken_sdk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A stand-in package shaped like a Stainless SDK whose sync client lost a hook."""
    name = "runguard_broken_sdk"
    # no eager submodule imports, so a test can take _streaming away
    write_stand_in(
        tmp_path,
        name,
        "_send_request",
        ("SyncAPIClient", "_send_request"),
        version="9.9.9",
        import_submodules=False,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    _forget(name)


def _forget(package: str) -> None:
    """Unload a stand-in package, so the next test imports its own."""
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[module]


def test_patch_refuses_an_sdk_that_lost_a_hook_point(broken_sdk: str) -> None:
    missing = f"{broken_sdk}._base_client.SyncAPIClient._send_request"
    assert _stainless.missing_hooks(broken_sdk, "_send_request") == [missing]
    with pytest.raises(runguard.InstrumentationError) as info:
        _stainless.patch(broken_sdk, openai_adapter)
    message = str(info.value)
    assert missing in message
    assert "9.9.9" in message
    base = sys.modules[f"{broken_sdk}._base_client"]
    assert not getattr(base, "_runguard_patched", False)
    # nothing was half-patched
    assert not hasattr(base.SyncAPIClient.__dict__["request"], "runguard_hook")


def test_patch_refuses_an_sdk_whose_hook_point_lost_a_parameter_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "runguard_reshaped_sdk"
    package = write_stand_in(tmp_path, name, "_send_request", import_submodules=False)
    base_client = package / "_base_client.py"
    source = base_client.read_text()
    shape = "def _process_response_data(self, *, data, cast_to, response):"
    assert shape in source
    reshaped = shape.replace("cast_to, response", "cast_to, **rest")
    base_client.write_text(source.replace(shape, reshaped))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        missing = f"{name}._base_client.BaseClient._process_response_data's parameter 'response'"
        assert _stainless.missing_hooks(name, "_send_request") == [missing]
        with pytest.raises(runguard.InstrumentationError, match=re.escape(missing)):
            _stainless.patch(name, openai_adapter)
        base = sys.modules[f"{name}._base_client"]
        assert not hasattr(vars(base.SyncAPIClient)["request"], "runguard_hook")
    finally:
        _forget(name)


def test_patch_names_a_missing_streaming_module(
    broken_sdk: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / broken_sdk / "_streaming.py").unlink()
    monkeypatch.delitem(sys.modules, f"{broken_sdk}._streaming", raising=False)
    with pytest.raises(runguard.InstrumentationError) as info:
        _stainless.patch(broken_sdk, openai_adapter)
    assert f"{broken_sdk}._streaming" in str(info.value)


def test_client_built_before_the_guard_is_guarded(fake: FakeProvider) -> None:
    # Built before this test enters a guard; resources and raw wrappers bind
    # methods at construction, so only hooks on the base client see their calls.
    client = fake.openai(max_retries=0)
    completions = client.chat.completions
    raw = client.chat.completions.with_raw_response
    with RunGuard(max_calls=2, raise_on_exit=False) as guard:
        completions.create(model=MODEL, messages=MESSAGES)
        raw.create(model=MODEL, messages=MESSAGES)
        with pytest.raises(BudgetExceeded):
            completions.create(model=MODEL, messages=MESSAGES)
    assert fake.wire_count == 2
    assert guard.usage.calls == 2


LATE_PATCH_SCRIPT = """
import openai

from runguard.testing import FakeProvider, Reply

fake = FakeProvider(default=Reply(input_tokens=21, output_tokens=4))
client = fake.openai(max_retries=0)
aclient = fake.async_openai(max_retries=0)
completions = client.chat.completions
raw = client.chat.completions.with_raw_response
legacy = client.completions  # another resource, one every openai SDK has
assert not getattr(openai._base_client, "_runguard_patched", False), "patched too early"

import asyncio

from runguard import BudgetExceeded, RunGuard

with RunGuard(max_calls=4, raise_on_exit=False) as guard:
    completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    raw.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    legacy.create(model="gpt-3.5-turbo-instruct", prompt="x")
    asyncio.run(aclient.chat.completions.create(model="gpt-4o", messages=[]))
    try:
        completions.create(model="gpt-4o", messages=[])
    except BudgetExceeded:
        print("refused")
print(guard.usage.calls, guard.usage.input_tokens, guard.usage.output_tokens, fake.wire_count)
"""


def test_clients_built_before_the_first_guard_of_the_process_are_guarded() -> None:
    # Patching happens on the first guard entry of a process; only a fresh
    # interpreter can show that objects built before it are still covered.
    result = subprocess.run(
        [sys.executable, "-c", LATE_PATCH_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused", "4", str(4 * 21), str(4 * 4), "4"]
