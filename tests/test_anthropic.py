"""RunGuard over the real ``anthropic`` SDK, talking to ``runguard.testing.FakeProvider``.

Ground truth is what reached the fake wire and the usage the scripted
:class:`Reply` sent back (the fake reports fresh input apart from cache reads
and writes, as Anthropic does); dollars are checked against
``genai_prices.calc_price``.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from typing import Any

import anthropic
import genai_prices
import pydantic
import pytest

import runguard
from _sdk import surface
from runguard import BudgetExceeded, GuardTripped, RunGuard, UnknownModelPrice
from runguard.pricing import dollars
from runguard.providers import missing_hooks
from runguard.testing import FakeProvider, Reply

MODEL = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "Say hello as JSON"}]
REPLY = Reply(text='{"answer": "hello"}', input_tokens=31, output_tokens=7)
CACHED = Reply(
    input_tokens=12100, cache_read_tokens=10000, cache_write_tokens=2000, output_tokens=100
)


class Answer(pydantic.BaseModel):
    answer: str


def catalogue_price(model: str = MODEL, **tokens: int) -> float:
    usage = genai_prices.Usage(**tokens)
    return float(genai_prices.calc_price(usage, model, provider_id="anthropic").total_price)


def assert_exact(usage: runguard.Usage, reply: Reply = REPLY, model: str = MODEL) -> None:
    assert usage.calls == 1
    assert usage.input_tokens == reply.input_tokens
    assert usage.output_tokens == reply.output_tokens
    assert usage.cache_read_tokens == reply.cache_read_tokens
    assert usage.cache_write_tokens == reply.cache_write_tokens
    assert usage.estimated_calls == 0
    assert usage.unpriced_calls == 0
    expected = catalogue_price(
        model,
        input_tokens=reply.input_tokens,
        output_tokens=reply.output_tokens,
        cache_read_tokens=reply.cache_read_tokens,
        cache_write_tokens=reply.cache_write_tokens,
    )
    assert usage.cost_usd == pytest.approx(expected)


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=REPLY)


@pytest.fixture
def client(fake: FakeProvider) -> anthropic.Anthropic:
    return fake.anthropic(max_retries=0)


@pytest.fixture
def aclient(fake: FakeProvider) -> anthropic.AsyncAnthropic:
    return fake.async_anthropic(max_retries=0)


def create(client: Any, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 100)
    return client.messages.create(model=MODEL, messages=MESSAGES, **kwargs)


# -- messages.create ----------------------------------------------------------------


def test_create_is_counted_once_with_exact_usage(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with RunGuard() as guard:
        message = create(client)
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/v1/messages")]
    assert message.usage.output_tokens == guard.usage.output_tokens
    assert_exact(guard.usage)


async def test_async_create_is_counted_once_with_exact_usage(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    with RunGuard() as guard:
        await create(aclient)
    assert [r.path for r in fake.requests] == ["/v1/messages"]
    assert_exact(guard.usage)


def test_create_stream_is_counted_once_with_exact_usage(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    unguarded = [event.type for event in create(client, stream=True)]
    with RunGuard() as guard:
        events = [event.type for event in create(client, stream=True)]
    assert fake.wire_count == 2
    assert fake.requests[0].body == fake.requests[1].body  # nothing added on the wire
    assert events == unguarded
    assert_exact(guard.usage)


async def test_async_create_stream_is_counted_once_with_exact_usage(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    with RunGuard() as guard:
        stream = await create(aclient, stream=True)
        events = [event.type async for event in stream]
    assert fake.wire_count == 1
    assert events[0] == "message_start"
    assert events[-1] == "message_stop"
    assert_exact(guard.usage)


def test_stream_helper_is_counted_once_with_exact_usage(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with (
        RunGuard() as guard,
        client.messages.stream(model=MODEL, messages=MESSAGES, max_tokens=100) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert fake.wire_count == 1
    assert text == REPLY.text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        guard.usage.input_tokens,
        guard.usage.output_tokens,
    )
    assert_exact(guard.usage)


async def test_async_stream_helper_is_counted_once_with_exact_usage(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    with RunGuard() as guard:
        async with aclient.messages.stream(
            model=MODEL, messages=MESSAGES, max_tokens=100
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert fake.wire_count == 1
    assert text == REPLY.text
    assert final.usage.output_tokens == REPLY.output_tokens
    assert_exact(guard.usage)


def test_stream_helper_final_message_without_iterating_is_counted_once(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with (
        RunGuard() as guard,
        client.messages.stream(model=MODEL, messages=MESSAGES, max_tokens=100) as stream,
    ):
        final = stream.get_final_message()
    assert fake.wire_count == 1
    assert final.content[0].text == REPLY.text
    assert_exact(guard.usage)


def test_parse_is_counted_once(fake: FakeProvider, client: anthropic.Anthropic) -> None:
    parse = surface(client, "messages.parse")
    with RunGuard() as guard:
        parsed = parse(model=MODEL, messages=MESSAGES, max_tokens=100, output_format=Answer)
    assert parsed.parsed_output == Answer(answer="hello")
    assert [r.path for r in fake.requests] == ["/v1/messages"]
    assert_exact(guard.usage)


async def test_async_parse_is_counted_once(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    parse = surface(aclient, "messages.parse")
    with RunGuard() as guard:
        await parse(model=MODEL, messages=MESSAGES, max_tokens=100, output_format=Answer)
    assert fake.wire_count == 1
    assert_exact(guard.usage)


# -- beta ----------------------------------------------------------------------------


def test_beta_create_is_counted_once(fake: FakeProvider, client: anthropic.Anthropic) -> None:
    with RunGuard() as guard:
        client.beta.messages.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    assert [r.path for r in fake.requests] == ["/v1/messages"]
    assert_exact(guard.usage)


async def test_async_beta_create_is_counted_once(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    with RunGuard() as guard:
        await aclient.beta.messages.create(model=MODEL, messages=MESSAGES, max_tokens=100)
    assert fake.wire_count == 1
    assert_exact(guard.usage)


def test_beta_stream_helper_is_counted_once(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    beta_stream = surface(client, "beta.messages.stream")
    with (
        RunGuard() as guard,
        beta_stream(model=MODEL, messages=MESSAGES, max_tokens=100) as stream,
    ):
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert fake.wire_count == 1
    assert text == REPLY.text
    assert final.usage.output_tokens == REPLY.output_tokens
    assert_exact(guard.usage)


async def test_async_beta_stream_helper_is_counted_once(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    beta_stream = surface(aclient, "beta.messages.stream")
    with RunGuard() as guard:
        async with beta_stream(model=MODEL, messages=MESSAGES, max_tokens=100) as stream:
            await stream.get_final_message()
    assert fake.wire_count == 1
    assert_exact(guard.usage)


# -- raw and streaming responses -----------------------------------------------------


def test_raw_response_never_parsed_is_still_counted(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with RunGuard() as guard:
        raw = client.messages.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=100
        )
        usage = guard.usage
    assert raw.http_response.status_code == 200
    assert fake.wire_count == 1
    assert_exact(usage)


def test_raw_response_parsed_twice_is_counted_once(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with RunGuard() as guard:
        raw = client.messages.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=100
        )
        raw.parse()
        raw.parse()
    assert fake.wire_count == 1
    assert_exact(guard.usage)


async def test_async_raw_response_is_counted_once(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    with RunGuard() as guard:
        raw = await aclient.messages.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=100
        )
        unparsed = guard.usage
        for _ in range(2):
            parsed = raw.parse()  # a coroutine, except on SDKs whose async raw parse is sync
            if inspect.isawaitable(parsed):
                await parsed
    assert fake.wire_count == 1
    assert_exact(unparsed)
    assert_exact(guard.usage)


def test_streaming_response_parse_is_counted_once(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with RunGuard() as guard:
        with client.messages.with_streaming_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=100
        ) as response:
            response.parse()
            response.parse()
        usage = guard.usage
    assert fake.wire_count == 1
    assert_exact(usage)


def test_legacy_completions_are_counted_once(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    completions = surface(client, "completions")
    with RunGuard() as guard:
        completions.create(
            model="claude-2.1", prompt="\n\nHuman: hi\n\nAssistant:", max_tokens_to_sample=50
        )
    assert fake.count("/v1/complete") == 1
    assert guard.usage.calls == 1


# -- pricing -------------------------------------------------------------------------


def test_cache_reads_and_writes_are_priced_as_genai_prices_prices_them(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    fake.script(CACHED)
    with RunGuard() as guard:
        create(client)
    sent = fake.requests[0]
    assert sent.path == "/v1/messages"
    assert guard.usage.input_tokens == 12100  # cache reads and writes included
    assert_exact(guard.usage, CACHED)


def test_cache_usage_on_a_stream_is_exact(fake: FakeProvider, client: anthropic.Anthropic) -> None:
    fake.script(CACHED)
    with RunGuard() as guard:
        for _ in create(client, stream=True):
            pass
    assert_exact(guard.usage, CACHED)


class DeltaUsage(FakeProvider):
    """Streams whose ``message_delta`` reports ``usage`` instead of output tokens alone.

    Server tools make the API report input that grew during the message there; a proxy
    may send the cache fields of that event as null.
    """

    def __init__(self, usage: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.usage = usage

    def _respond(self, request: Any, wire: Any, reply: Reply) -> Any:
        response = super()._respond(request, wire, reply)
        if response.headers.get("content-type") != "text/event-stream":
            return response
        events = []
        for event in response.content.decode().split("\n\n"):
            if event.startswith("event: message_delta"):
                name, data = event.split("\n", 1)
                delta = json.loads(data.removeprefix("data: "))
                delta["usage"] = self.usage
                event = f"{name}\ndata: {json.dumps(delta)}"
            events.append(event)
        return type(response)(
            200, content="\n\n".join(events).encode(), headers=dict(response.headers)
        )


@pytest.mark.parametrize("cache", ["null", "absent"])
def test_usage_fields_a_stream_event_leaves_out_keep_their_earlier_value(cache: str) -> None:
    # message_start: 100 fresh input tokens and 10,000 read from the cache; the delta
    # says the fresh input grew to 600 and is silent on the cache
    grown: dict[str, Any] = {"input_tokens": 600, "output_tokens": 50}
    if cache == "null":
        grown |= {"cache_read_input_tokens": None, "cache_creation_input_tokens": None}
    fake = DeltaUsage(grown, default=Reply(input_tokens=10_100, cache_read_tokens=10_000))
    client = fake.anthropic(max_retries=0)
    with (
        RunGuard() as guard,
        client.messages.stream(model=MODEL, messages=MESSAGES, max_tokens=200) as stream,
    ):
        stream.get_final_message()
    usage = guard.usage
    assert usage.input_tokens == 10_600  # the fresh 600 and the 10,000 read
    assert (usage.cache_read_tokens, usage.output_tokens) == (10_000, 50)
    assert fake.wire_count == 1


async def test_async_cache_usage_on_the_stream_helper_is_exact(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    fake.script(CACHED)
    with RunGuard() as guard:
        async with aclient.messages.stream(
            model=MODEL, messages=MESSAGES, max_tokens=200
        ) as stream:
            await stream.get_final_message()
    assert_exact(guard.usage, CACHED)


def test_cost_uses_the_model_the_response_names(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    answered_by = "claude-sonnet-4-5"
    reply = Reply(model=answered_by, input_tokens=500, output_tokens=200)
    fake.script(reply)
    with RunGuard() as guard:
        create(client)
    assert fake.requests[0].model == MODEL
    requested = catalogue_price(MODEL, input_tokens=500, output_tokens=200)
    answered = catalogue_price(answered_by, input_tokens=500, output_tokens=200)
    assert answered != pytest.approx(requested)
    assert guard.usage.cost_usd == pytest.approx(answered)


def test_unknown_model_under_a_dollar_ceiling_is_refused_before_sending(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with pytest.raises(UnknownModelPrice) as info, RunGuard(max_cost_usd=1.0):
        client.messages.create(model="claude-in-house", messages=MESSAGES, max_tokens=10)
    assert fake.wire_count == 0
    assert info.value.provider == "anthropic"
    assert "'claude-in-house'" in str(info.value)
    assert "runguard.Price(" in str(info.value)


# -- refusals ------------------------------------------------------------------------


def test_output_ceiling_refuses_before_sending(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_output_tokens=100, name="claude"):
        create(client, max_tokens=200)
    assert fake.wire_count == 0
    trip = info.value.trip
    assert (trip.guard, trip.limit, trip.observed, trip.run) == (
        "max_output_tokens",
        100,
        200,
        "claude",
    )
    message = str(info.value)
    for part in ("max_output_tokens", "100", "200", MODEL):
        assert part in message
    assert info.value.usage.calls == 0


def test_stream_helper_is_refused_before_sending(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    with (
        pytest.raises(BudgetExceeded) as info,
        RunGuard(max_output_tokens=100),
        client.messages.stream(model=MODEL, messages=MESSAGES, max_tokens=200),
    ):
        pass
    assert fake.wire_count == 0
    assert info.value.trip.observed == 200


def test_dollar_ceiling_refuses_the_worst_case_before_sending(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    output_only = catalogue_price(output_tokens=4000)
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_cost_usd=output_only / 2):
        create(client, max_tokens=4000)
    assert fake.wire_count == 0
    trip = info.value.trip
    assert trip.guard == "max_cost_usd"
    assert trip.limit == pytest.approx(output_only / 2)
    # the worst case prices the full output cap plus the estimated input
    assert trip.observed > output_only
    assert dollars(trip.observed) in str(info.value)


def test_input_ceiling_refuses_before_sending(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    history = [{"role": "user", "content": "lorem ipsum dolor " * 100}]
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_input_tokens=100):
        client.messages.create(model=MODEL, messages=history, max_tokens=10)
    assert fake.wire_count == 0
    trip = info.value.trip
    assert trip.guard == "max_input_tokens"
    assert trip.observed > 100
    assert f"{int(trip.observed):,}" in str(info.value)


def test_system_prompt_counts_toward_the_input_estimate(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    def estimate(**kwargs: Any) -> float:
        with pytest.raises(BudgetExceeded) as info, RunGuard(max_input_tokens=1):
            create(client, **kwargs)
        return info.value.trip.observed

    assert estimate(system="You are a terse assistant. " * 20) > estimate()
    assert fake.wire_count == 0


async def test_tripped_guard_refuses_everything_at_once(
    fake: FakeProvider, client: anthropic.Anthropic, aclient: anthropic.AsyncAnthropic
) -> None:
    with RunGuard(max_output_tokens=100, raise_on_exit=False) as guard:
        with pytest.raises(BudgetExceeded) as first:
            create(client, max_tokens=200)
        with pytest.raises(BudgetExceeded) as sync_call:
            create(client, max_tokens=1)
        with pytest.raises(BudgetExceeded) as sync_stream:
            create(client, max_tokens=1, stream=True)
        with pytest.raises(BudgetExceeded) as async_call:
            await create(aclient, max_tokens=1)
        with pytest.raises(BudgetExceeded) as async_helper:
            async with aclient.messages.stream(model=MODEL, messages=MESSAGES, max_tokens=1):
                pass
        with pytest.raises(BudgetExceeded) as beta:
            client.beta.messages.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert fake.wire_count == 0
    for refused in (sync_call, sync_stream, async_call, async_helper, beta):
        assert refused.value.trip == first.value.trip
    assert guard.usage.calls == 0


# -- non-billable calls --------------------------------------------------------------


def test_count_tokens_and_model_list_pass_a_tripped_guard_uncounted(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    count_tokens = surface(client, "messages.count_tokens")
    list_models = surface(client, "models.list")
    with RunGuard(max_calls=1, raise_on_exit=False) as guard:
        create(client)
        with pytest.raises(BudgetExceeded):
            create(client)
        counted = count_tokens(model=MODEL, messages=MESSAGES)
        list_models()
    assert counted.input_tokens == REPLY.input_tokens
    assert [(r.method, r.path) for r in fake.requests] == [
        ("POST", "/v1/messages"),
        ("POST", "/v1/messages/count_tokens"),
        ("GET", "/v1/models"),
    ]
    assert_exact(guard.usage)


async def test_async_count_tokens_is_not_an_llm_call(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    count_tokens = surface(aclient, "messages.count_tokens")
    with RunGuard(max_calls=1) as guard:
        await count_tokens(model=MODEL, messages=MESSAGES)
        await count_tokens(model=MODEL, messages=MESSAGES)
    assert fake.count("/v1/messages/count_tokens") == 2
    assert guard.usage == runguard.Usage()


# -- failed calls --------------------------------------------------------------------


def test_failed_call_counts_one_call_and_releases_its_reservation(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    fake.script(Reply(status=500))
    with RunGuard(max_output_tokens=150) as guard:
        with pytest.raises(anthropic.InternalServerError):
            create(client, max_tokens=100)
        failed = guard.usage
        create(client, max_tokens=100)  # fits only if the failed call's 100 were released
    assert fake.wire_count == 2
    assert (failed.calls, failed.input_tokens, failed.output_tokens) == (1, 0, 0)
    assert failed.cost_usd == 0.0
    assert failed.estimated_calls == 0
    assert guard.usage.calls == 2


async def test_async_failed_stream_counts_one_call_and_releases_its_reservation(
    fake: FakeProvider, aclient: anthropic.AsyncAnthropic
) -> None:
    fake.script(Reply(status=529))
    with RunGuard(max_output_tokens=150) as guard:
        with pytest.raises(anthropic.APIStatusError) as info:
            await create(aclient, max_tokens=100, stream=True)
        failed = guard.usage
        await create(aclient, max_tokens=100)
    assert info.value.status_code == 529
    assert fake.wire_count == 2
    assert (failed.calls, failed.input_tokens, failed.output_tokens) == (1, 0, 0)
    assert guard.usage.calls == 2


# -- exceptions and instrumentation --------------------------------------------------


def test_budget_exceeded_is_not_an_anthropic_error() -> None:
    assert issubclass(BudgetExceeded, GuardTripped)
    for sdk_error in (
        anthropic.AnthropicError,
        anthropic.APIError,
        anthropic.APIStatusError,
        anthropic.APIConnectionError,
        anthropic.RateLimitError,
    ):
        assert not issubclass(BudgetExceeded, sdk_error), sdk_error


def test_refusal_message_does_not_look_retryable(client: anthropic.Anthropic) -> None:
    with pytest.raises(BudgetExceeded) as info, RunGuard(max_calls=1):
        create(client)
        create(client)
    message = str(info.value).lower()
    assert "429" not in message
    assert "rate limit" not in message


def test_installed_anthropic_has_every_hook_point() -> None:
    assert missing_hooks("anthropic") == []


LATE_PATCH_SCRIPT = """
import anthropic

from runguard.testing import FakeProvider, Reply

fake = FakeProvider(default=Reply(input_tokens=21, output_tokens=4))
client = fake.anthropic(max_retries=0)
messages = client.messages
raw = client.messages.with_raw_response
beta = client.beta.messages
assert not getattr(anthropic._base_client, "_runguard_patched", False), "patched too early"

from runguard import BudgetExceeded, RunGuard

kwargs = {"model": "claude-haiku-4-5", "max_tokens": 10, "messages": []}
with RunGuard(max_calls=3, raise_on_exit=False) as guard:
    messages.create(**kwargs)
    raw.create(**kwargs)
    for _ in beta.create(**kwargs, stream=True):  # a beta stream every anthropic SDK has
        pass
    try:
        messages.create(**kwargs)
    except BudgetExceeded:
        print("refused")
print(guard.usage.calls, guard.usage.input_tokens, guard.usage.output_tokens, fake.wire_count)
"""


def test_clients_built_before_the_first_guard_of_the_process_are_guarded() -> None:
    result = subprocess.run(
        [sys.executable, "-c", LATE_PATCH_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused", "3", str(3 * 21), str(3 * 4), "3"]


def test_response_without_usage_is_charged_the_reservation_as_estimated(
    fake: FakeProvider, client: anthropic.Anthropic
) -> None:
    fake.script(Reply(usage=False))
    with RunGuard() as guard:
        message = create(client, max_tokens=64)
    assert not message.to_dict().get("usage")  # the answer carried none
    usage = guard.usage
    assert fake.wire_count == 1
    assert usage.calls == usage.estimated_calls == 1
    assert usage.input_tokens > 0  # RunGuard's own estimate, not a reported zero
    assert usage.output_tokens == 64
