"""``max_input_tokens_per_call`` over the real SDKs: one call too large is never sent.

Ground truth is what reached the fake provider (``fake.wire_count``,
``fake.requests``). Input estimates are RunGuard's own, so the sizes here are
chosen to leave no doubt on which side of the limit a call falls: English
text of common words is about one token a word, and every bound below allows
it to be anywhere from half a token to one and a half tokens a word.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

import _sdk
from runguard import ContextOverflow, GuardTripped, RunGuard, guarded
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
LIMIT = 5_000
SMALL = 100  # words: at most ~150 tokens
BIG = 20_000  # words: at least ~10,000 tokens
LOW, HIGH = 0.5, 1.5  # tokens per word, the loosest plausible bounds
_SENTENCE = "the quick brown fox jumps over the lazy dog while we read"


def words(n: int, salt: str = "") -> str:
    """``n`` common English words (``salt`` makes texts of equal size distinct)."""
    text = " ".join(itertools.islice(itertools.cycle(_SENTENCE.split(" ")), n))
    return f"{salt} {text}" if salt else text


SMALL_TEXT = words(SMALL)
BIG_TEXT = words(BIG)


class Clients(NamedTuple):
    openai: Any
    anthropic: Any
    async_openai: Any
    async_anthropic: Any


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=Reply(text="ok", input_tokens=50, output_tokens=5))


@pytest.fixture
def clients(fake: FakeProvider) -> Clients:
    return Clients(
        fake.openai(max_retries=0),
        fake.anthropic(max_retries=0),
        fake.async_openai(max_retries=0),
        fake.async_anthropic(max_retries=0),
    )


# -- helpers ---------------------------------------------------------------------------
# Every surface sends ``text`` as the user's input in one whole call (streams read to
# the end).


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def chat_create(c: Clients, text: str) -> None:
    c.openai.chat.completions.create(model=MODEL, messages=user(text), max_tokens=16)


def chat_stream(c: Clients, text: str) -> None:
    stream = c.openai.chat.completions.create(
        model=MODEL, messages=user(text), max_tokens=16, stream=True
    )
    for _ in stream:
        pass


def chat_stream_helper(c: Clients, text: str) -> None:
    helper = _sdk.chat_helper(c.openai)
    with helper(model=MODEL, messages=user(text), max_tokens=16) as stream:
        stream.get_final_completion()


def responses_create(c: Clients, text: str) -> None:
    _sdk.surface(c.openai, "responses").create(model=MODEL, input=text, max_output_tokens=16)


def responses_stream(c: Clients, text: str) -> None:
    responses = _sdk.surface(c.openai, "responses")
    for _ in responses.create(model=MODEL, input=text, max_output_tokens=16, stream=True):
        pass


def anthropic_create(c: Clients, text: str) -> None:
    c.anthropic.messages.create(model=CLAUDE, max_tokens=16, messages=user(text))


def anthropic_stream(c: Clients, text: str) -> None:
    for _ in c.anthropic.messages.create(
        model=CLAUDE, max_tokens=16, messages=user(text), stream=True
    ):
        pass


def anthropic_stream_helper(c: Clients, text: str) -> None:
    with c.anthropic.messages.stream(model=CLAUDE, max_tokens=16, messages=user(text)) as stream:
        stream.get_final_message()


async def achat_create(c: Clients, text: str) -> None:
    await c.async_openai.chat.completions.create(model=MODEL, messages=user(text), max_tokens=16)


async def achat_stream(c: Clients, text: str) -> None:
    stream = await c.async_openai.chat.completions.create(
        model=MODEL, messages=user(text), max_tokens=16, stream=True
    )
    async for _ in stream:
        pass


async def aresponses_create(c: Clients, text: str) -> None:
    responses = _sdk.surface(c.async_openai, "responses")
    await responses.create(model=MODEL, input=text, max_output_tokens=16)


async def aanthropic_create(c: Clients, text: str) -> None:
    await c.async_anthropic.messages.create(model=CLAUDE, max_tokens=16, messages=user(text))


async def aanthropic_stream(c: Clients, text: str) -> None:
    stream = await c.async_anthropic.messages.create(
        model=CLAUDE, max_tokens=16, messages=user(text), stream=True
    )
    async for _ in stream:
        pass


async def aanthropic_stream_helper(c: Clients, text: str) -> None:
    async with c.async_anthropic.messages.stream(
        model=CLAUDE, max_tokens=16, messages=user(text)
    ) as stream:
        await stream.get_final_message()


SYNC_SURFACES = [
    pytest.param(chat_create, "/v1/chat/completions", id="chat.completions.create"),
    pytest.param(chat_stream, "/v1/chat/completions", id="chat.completions.create-stream"),
    pytest.param(chat_stream_helper, "/v1/chat/completions", id="chat.completions.stream"),
    pytest.param(responses_create, "/v1/responses", id="responses.create"),
    pytest.param(responses_stream, "/v1/responses", id="responses.create-stream"),
    pytest.param(anthropic_create, "/v1/messages", id="messages.create"),
    pytest.param(anthropic_stream, "/v1/messages", id="messages.create-stream"),
    pytest.param(anthropic_stream_helper, "/v1/messages", id="messages.stream"),
]

ASYNC_SURFACES = [
    pytest.param(achat_create, "/v1/chat/completions", id="async-chat.completions.create"),
    pytest.param(achat_stream, "/v1/chat/completions", id="async-chat.completions.create-stream"),
    pytest.param(aresponses_create, "/v1/responses", id="async-responses.create"),
    pytest.param(aanthropic_create, "/v1/messages", id="async-messages.create"),
    pytest.param(aanthropic_stream, "/v1/messages", id="async-messages.create-stream"),
    pytest.param(aanthropic_stream_helper, "/v1/messages", id="async-messages.stream"),
]


def on_wire(fake: FakeProvider, text: str) -> int:
    """How many requests that reached the provider carried ``text``."""
    return sum(1 for r in fake.requests if text in json.dumps(r.body))


def assert_overflow(exc: GuardTripped, limit: int, words_sent: int) -> None:
    """A per-call refusal whose estimate is plausible for ``words_sent`` words of input."""
    assert isinstance(exc, ContextOverflow)
    trip = exc.trip
    assert trip.guard == "max_input_tokens_per_call"
    assert trip.limit == limit
    assert trip.observed > limit
    assert LOW * words_sent <= trip.observed <= HIGH * words_sent + 100
    assert "max_input_tokens_per_call" in str(exc)


def estimate(send: Callable[[str], Any], text: str) -> int:
    """RunGuard's input estimate for ``send(text)``, read from a refusal (nothing is sent)."""
    with pytest.raises(ContextOverflow) as info, RunGuard(max_input_tokens_per_call=1):
        send(text)
    return int(info.value.trip.observed)


def test_the_sizes_used_here_are_unambiguous() -> None:
    assert HIGH * SMALL + 100 < LIMIT < LOW * BIG
    assert len(SMALL_TEXT.split()) == SMALL
    assert len(BIG_TEXT.split()) == BIG


# -- one call too large, on every surface -------------------------------------------------


@pytest.mark.parametrize(("surface", "path"), SYNC_SURFACES)
def test_an_oversized_call_is_refused_before_sending_while_a_small_one_passes(
    fake: FakeProvider, clients: Clients, surface: Callable[[Clients, str], None], path: str
) -> None:
    with RunGuard(max_input_tokens_per_call=LIMIT, raise_on_exit=False) as guard:
        surface(clients, SMALL_TEXT)
        with pytest.raises(ContextOverflow) as info:
            surface(clients, BIG_TEXT)
    assert [r.path for r in fake.requests] == [path]
    assert on_wire(fake, SMALL_TEXT) == 1
    assert on_wire(fake, BIG_TEXT) == 0
    assert guard.usage.calls == 1
    assert info.value.trip is guard.trip
    assert info.value.usage.calls == 1
    assert_overflow(info.value, LIMIT, BIG)


@pytest.mark.parametrize(("surface", "path"), ASYNC_SURFACES)
async def test_an_oversized_async_call_is_refused_before_sending_while_a_small_one_passes(
    fake: FakeProvider, clients: Clients, surface: Callable[[Clients, str], Any], path: str
) -> None:
    async with RunGuard(max_input_tokens_per_call=LIMIT, raise_on_exit=False) as guard:
        await surface(clients, SMALL_TEXT)
        with pytest.raises(ContextOverflow) as info:
            await surface(clients, BIG_TEXT)
    assert [r.path for r in fake.requests] == [path]
    assert on_wire(fake, BIG_TEXT) == 0
    assert guard.usage.calls == 1
    assert_overflow(info.value, LIMIT, BIG)


def test_a_refused_stream_creates_no_stream(fake: FakeProvider, clients: Clients) -> None:
    stream = None
    with (
        pytest.raises(ContextOverflow),
        RunGuard(max_input_tokens_per_call=LIMIT),
    ):
        stream = clients.openai.chat.completions.create(
            model=MODEL, messages=user(BIG_TEXT), stream=True
        )
    assert stream is None
    assert fake.wire_count == 0


def test_a_refused_call_is_not_retried_by_the_sdk(fake: FakeProvider) -> None:
    client = fake.openai()  # the SDK's default retries are on
    with pytest.raises(ContextOverflow), RunGuard(max_input_tokens_per_call=LIMIT):
        client.chat.completions.create(model=MODEL, messages=user(BIG_TEXT))
    assert fake.wire_count == 0


def anthropic_create_capped(c: Clients) -> None:
    # the SDK wants a stream for a cap this large
    with c.anthropic.messages.stream(model=CLAUDE, max_tokens=60_000, messages=user("hi")) as s:
        s.get_final_message()


def test_the_limit_is_on_input_only_a_large_output_cap_passes(
    fake: FakeProvider, clients: Clients
) -> None:
    with RunGuard(max_input_tokens_per_call=LIMIT) as guard:
        clients.openai.chat.completions.create(
            model=MODEL, messages=user(SMALL_TEXT), max_tokens=100_000
        )
        anthropic_create_capped(clients)
    assert fake.wire_count == 2
    assert not guard.tripped


# -- what counts as input ---------------------------------------------------------------------


SENDS_WITH_BIG_PARTS = {
    "anthropic-system": lambda c: c.anthropic.messages.create(
        model=CLAUDE, max_tokens=16, system=BIG_TEXT, messages=user("hi")
    ),
    "responses-instructions": lambda c: _sdk.surface(c.openai, "responses").create(
        model=MODEL, instructions=BIG_TEXT, input="hi"
    ),
    "chat-tool-result": lambda c: c.openai.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "read it"},
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "read", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": BIG_TEXT},
        ],
    ),
    "chat-content-parts": lambda c: c.openai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": BIG_TEXT}]}],
    ),
    "anthropic-tool-result": lambda c: c.anthropic.messages.create(
        model=CLAUDE,
        max_tokens=16,
        messages=[
            {"role": "user", "content": "read it"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": BIG_TEXT}],
            },
        ],
    ),
}


def anthropic_tool_input(key: str) -> Callable[[Clients], Any]:
    """A history whose tool call carries the big text in its input, under ``key``.

    A tool's input is the caller's own JSON: a key that elsewhere marks an identifier
    or a binary payload (``id``, ``data``, ``image_url``) holds text here like any other.
    """

    def send(c: Clients) -> Any:
        turn = {"type": "tool_use", "id": "toolu_1", "name": "save", "input": {key: BIG_TEXT}}
        return c.anthropic.messages.create(
            model=CLAUDE,
            max_tokens=16,
            messages=[
                {"role": "user", "content": "save it"},
                {"role": "assistant", "content": [turn]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}]},
            ],
        )

    return send


SENDS_WITH_BIG_PARTS.update(
    {
        f"anthropic-tool-input-{key}": anthropic_tool_input(key)
        for key in ("data", "id", "image_url")
    }
)
SENDS_WITH_BIG_PARTS["chat-tool-schema-property-id"] = lambda c: c.openai.chat.completions.create(
    model=MODEL,
    messages=user("hi"),
    tools=[
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"id": {"type": "string", "description": BIG_TEXT}},
                },
            },
        }
    ],
)


@pytest.mark.parametrize("kind", sorted(SENDS_WITH_BIG_PARTS))
def test_every_part_of_the_input_counts_toward_the_limit(
    fake: FakeProvider, clients: Clients, kind: str
) -> None:
    with pytest.raises(ContextOverflow) as info, RunGuard(max_input_tokens_per_call=LIMIT):
        SENDS_WITH_BIG_PARTS[kind](clients)
    assert fake.wire_count == 0
    assert_overflow(info.value, LIMIT, BIG)


def test_counting_tokens_of_a_large_history_is_not_an_llm_call(
    fake: FakeProvider, clients: Clients
) -> None:
    # an agent asking how big its history is, to decide to summarise, must be let through
    count_tokens = _sdk.surface(clients.anthropic, "messages.count_tokens")
    with RunGuard(max_input_tokens_per_call=LIMIT) as guard:
        counted = count_tokens(model=CLAUDE, messages=user(BIG_TEXT))
    assert counted.input_tokens == 50
    assert fake.count("/v1/messages/count_tokens") == 1
    assert not guard.tripped


# -- a growing conversation ------------------------------------------------------------------
# The user's words in the history grow 500 -> 2,000 -> 8,000 -> 32,000: even at the
# loosest bounds the third history is under 15,000 tokens and the fourth over it.

GROWTH = [500, 1_500, 6_000, 24_000]
GROWTH_LIMIT = 15_000


def test_the_growth_boundary_is_unambiguous() -> None:
    totals = list(itertools.accumulate(GROWTH))
    assert totals == [500, 2_000, 8_000, 32_000]
    assert HIGH * totals[2] * 1.2 + 100 < GROWTH_LIMIT < LOW * totals[3]


def _grow(
    send: Callable[[list[dict[str, str]]], Any],
) -> tuple[list[int], ContextOverflow]:
    """Send a history growing by GROWTH until refused; the sizes (in words) that were sent."""
    history: list[dict[str, str]] = []
    sent: list[int] = []
    total = 0
    with pytest.raises(ContextOverflow) as info:
        for turn, size in enumerate(GROWTH):
            if history:
                history.append({"role": "assistant", "content": "noted"})
            history.append({"role": "user", "content": words(size, salt=f"turn{turn}")})
            total += size
            send(history)
            sent.append(total)
    return sent, info.value


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_growing_conversation_is_refused_at_the_first_history_too_large(
    fake: FakeProvider, clients: Clients, provider: str
) -> None:
    def send(history: list[dict[str, str]]) -> None:
        if provider == "openai":
            clients.openai.chat.completions.create(model=MODEL, messages=history)
        else:
            clients.anthropic.messages.create(model=CLAUDE, max_tokens=256, messages=history)

    with RunGuard(max_input_tokens_per_call=GROWTH_LIMIT, raise_on_exit=False) as g:
        sent, refusal = _grow(send)
    assert sent == [500, 2_000, 8_000]
    assert fake.wire_count == 3
    # the last history on the wire is the third one, whole
    assert [len(r.body["messages"]) for r in fake.requests] == [1, 3, 5]
    assert on_wire(fake, "turn3") == 0
    assert g.usage.calls == 3
    assert_overflow(refusal, GROWTH_LIMIT, 32_000)


async def test_a_growing_async_conversation_is_refused_at_the_first_history_too_large(
    fake: FakeProvider, clients: Clients
) -> None:
    history: list[dict[str, str]] = []
    sent = 0
    with pytest.raises(ContextOverflow) as info:
        async with RunGuard(max_input_tokens_per_call=GROWTH_LIMIT):
            for turn, size in enumerate(GROWTH):
                if history:
                    history.append({"role": "assistant", "content": "noted"})
                history.append({"role": "user", "content": words(size, salt=f"turn{turn}")})
                stream = await clients.async_anthropic.messages.create(
                    model=CLAUDE, max_tokens=256, messages=history, stream=True
                )
                async for _ in stream:
                    pass
                sent += 1
    assert sent == 3
    assert fake.wire_count == 3
    assert_overflow(info.value, GROWTH_LIMIT, 32_000)


# -- the exact boundary -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(
            lambda c, t: c.openai.chat.completions.create(model=MODEL, messages=user(t)),
            id="openai",
        ),
        pytest.param(
            lambda c, t: c.anthropic.messages.create(model=CLAUDE, max_tokens=8, messages=user(t)),
            id="anthropic",
        ),
    ],
)
def test_a_call_estimated_at_exactly_the_limit_is_sent_one_token_over_is_not(
    fake: FakeProvider, clients: Clients, send: Callable[[Clients, str], Any]
) -> None:
    tokens = estimate(lambda text: send(clients, text), SMALL_TEXT)
    assert LOW * SMALL <= tokens <= HIGH * SMALL + 20
    assert fake.wire_count == 0
    with RunGuard(max_input_tokens_per_call=tokens) as at_limit:
        send(clients, SMALL_TEXT)
    assert fake.wire_count == 1
    assert not at_limit.tripped
    with pytest.raises(ContextOverflow) as info, RunGuard(max_input_tokens_per_call=tokens - 1):
        send(clients, SMALL_TEXT)
    assert fake.wire_count == 1
    assert info.value.trip.observed == tokens


# -- latching ---------------------------------------------------------------------------------


async def test_after_an_overflow_every_later_call_is_refused_even_small_ones(
    fake: FakeProvider, clients: Clients
) -> None:
    with RunGuard(max_input_tokens_per_call=LIMIT, raise_on_exit=False) as guard:
        chat_create(clients, SMALL_TEXT)
        with pytest.raises(ContextOverflow) as first:
            chat_create(clients, BIG_TEXT)
        later = [
            lambda: chat_create(clients, "hi"),
            lambda: chat_stream(clients, "hi"),
            lambda: anthropic_create(clients, "hi"),
            lambda: anthropic_stream_helper(clients, "hi"),
            lambda: achat_create(clients, "hi"),
            lambda: aanthropic_stream(clients, "hi"),
        ]
        for make_call in later:
            with pytest.raises(ContextOverflow) as info:
                result = make_call()
                if result is not None:  # a coroutine
                    await result
            assert info.value.trip is first.value.trip
    assert fake.wire_count == 1
    assert guard.usage.calls == 1


def test_a_swallowed_overflow_is_raised_again_where_the_guard_ends(
    fake: FakeProvider, clients: Clients
) -> None:
    def careless_agent() -> None:
        # ignores the refusal and ends its run as if all went well
        with contextlib.suppress(ContextOverflow):
            chat_create(clients, BIG_TEXT)

    with pytest.raises(ContextOverflow) as info, RunGuard(max_input_tokens_per_call=LIMIT) as g:
        careless_agent()
    assert info.value.trip is g.trip
    assert fake.wire_count == 0


# -- nesting ------------------------------------------------------------------------------------


def test_an_inner_per_call_limit_refuses_while_the_outer_guard_would_send(
    fake: FakeProvider, clients: Clients
) -> None:
    with RunGuard(name="outer") as outer:
        with (
            pytest.raises(ContextOverflow) as info,
            RunGuard(max_input_tokens_per_call=LIMIT, name="inner"),
        ):
            chat_create(clients, BIG_TEXT)
        assert info.value.trip.run == "inner"
        assert fake.wire_count == 0
        chat_create(clients, BIG_TEXT)  # the outer guard has no such limit
    assert fake.wire_count == 1
    assert on_wire(fake, BIG_TEXT) == 1
    assert outer.usage.calls == 1


def test_an_outer_per_call_limit_refuses_inside_a_plain_inner_guard(
    fake: FakeProvider, clients: Clients
) -> None:
    with (
        pytest.raises(ContextOverflow) as info,
        RunGuard(max_input_tokens_per_call=LIMIT, name="outer") as outer,
        RunGuard(name="inner") as inner,
    ):
        anthropic_create(clients, SMALL_TEXT)
        anthropic_create(clients, BIG_TEXT)
    assert info.value.trip is outer.trip
    assert info.value.trip.run == "outer"
    assert not inner.tripped
    assert fake.wire_count == 1


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-100, ValueError),
        (1.5, TypeError),
        (5000.0, TypeError),
        (True, TypeError),
        ("5000", TypeError),
    ],
)
def test_the_per_call_limit_must_be_a_positive_int(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_input_tokens_per_call"):
        RunGuard(max_input_tokens_per_call=value)
    with pytest.raises(error, match="max_input_tokens_per_call"):
        guarded(max_input_tokens_per_call=value)


def test_no_per_call_limit_by_default(fake: FakeProvider, clients: Clients) -> None:
    with RunGuard(max_input_tokens_per_call=None) as guard:
        chat_create(clients, BIG_TEXT)
    with RunGuard():
        anthropic_create(clients, BIG_TEXT)
    assert on_wire(fake, BIG_TEXT) == 2
    assert not guard.tripped
    assert guard.guards == ()
