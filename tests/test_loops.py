"""Loop guards over the real SDKs: ``max_repeated_tool_calls`` and ``max_identical_requests``.

Ground truth is what reached the fake provider (``fake.wire_count`` and
``fake.requests``) and the tool calls the SDK itself handed back to the agent
(read from the SDK's own result objects, not from RunGuard). A repeated tool
call is paid for and the *next* call is refused; an identical request is
refused before it is sent. Neither may ever trip on ordinary traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

import _sdk
from runguard import (
    Budget,
    BudgetUnavailable,
    GuardTripped,
    LoopDetected,
    RunGuard,
    ToolCall,
    guarded,
)
from runguard.guards import RepeatedToolCalls
from runguard.stores import MemoryStore
from runguard.testing import FakeProvider, Reply, WireRequest

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "find x"}]
SEARCH = ("search", {"q": "x"})
LOOPING = Reply(tool_calls=(SEARCH,))
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


class Clients(NamedTuple):
    openai: Any
    anthropic: Any
    async_openai: Any
    async_anthropic: Any


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=LOOPING)


@pytest.fixture
def clients(fake: FakeProvider) -> Clients:
    return Clients(
        fake.openai(max_retries=0),
        fake.anthropic(max_retries=0),
        fake.async_openai(max_retries=0),
        fake.async_anthropic(max_retries=0),
    )


@pytest.fixture
def client(clients: Clients) -> Any:
    return clients.openai


@pytest.fixture
def aclient(clients: Clients) -> Any:
    return clients.async_openai


# -- helpers ---------------------------------------------------------------------------
# Every surface makes one whole call (streams read to the end) and returns the tool
# calls the SDK showed the agent, as (name, arguments dict), read from the SDK's objects.

ToolCalls = list[tuple[str, Any]]


def _chat_tool_calls(message: Any) -> ToolCalls:
    return [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or ()]


def _responses_tool_calls(output: Any) -> ToolCalls:
    return [(o.name, json.loads(o.arguments)) for o in output if o.type == "function_call"]


def _tool_uses(content: Any) -> ToolCalls:
    return [(block.name, block.input) for block in content if block.type == "tool_use"]


def _chat_chunks(chunks: list[Any]) -> ToolCalls:
    pieces: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for tool in choice.delta.tool_calls or ():
                entry = pieces.setdefault(tool.index, ["", ""])
                entry[0] += tool.function.name or ""
                entry[1] += tool.function.arguments or ""
    return [(name, json.loads(args)) for name, args in pieces.values()]


def _anthropic_events(events: list[Any]) -> ToolCalls:
    blocks: dict[int, list[str]] = {}
    for event in events:
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            blocks[event.index] = [event.content_block.name, ""]
        elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            blocks[event.index][1] += event.delta.partial_json
    return [(name, json.loads(args)) for name, args in blocks.values()]


def _completed_output(events: list[Any]) -> Any:
    return next(e.response.output for e in events if e.type == "response.completed")


def chat_create(c: Clients) -> ToolCalls:
    answer = c.openai.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    return _chat_tool_calls(answer.choices[0].message)


def chat_stream(c: Clients) -> ToolCalls:
    stream = c.openai.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
    )
    return _chat_chunks(list(stream))


def chat_stream_helper(c: Clients) -> ToolCalls:
    helper = _sdk.chat_helper(c.openai)
    with helper(model=MODEL, messages=MESSAGES, tools=TOOLS) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    return _chat_tool_calls(final.choices[0].message)


def responses_create(c: Clients) -> ToolCalls:
    answer = _sdk.surface(c.openai, "responses").create(model=MODEL, input="find x")
    return _responses_tool_calls(answer.output)


def responses_stream(c: Clients) -> ToolCalls:
    responses = _sdk.surface(c.openai, "responses")
    events = list(responses.create(model=MODEL, input="find x", stream=True))
    return _responses_tool_calls(_completed_output(events))


def anthropic_create(c: Clients) -> ToolCalls:
    message = c.anthropic.messages.create(model=CLAUDE, max_tokens=64, messages=MESSAGES)
    return _tool_uses(message.content)


def anthropic_stream(c: Clients) -> ToolCalls:
    events = c.anthropic.messages.create(
        model=CLAUDE, max_tokens=64, messages=MESSAGES, stream=True
    )
    return _anthropic_events(list(events))


def anthropic_stream_helper(c: Clients) -> ToolCalls:
    with c.anthropic.messages.stream(model=CLAUDE, max_tokens=64, messages=MESSAGES) as stream:
        for _ in stream:
            pass
        message = stream.get_final_message()
    return _tool_uses(message.content)


def chat_raw_response(c: Clients) -> ToolCalls:
    raw = c.openai.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS
    )
    return _chat_tool_calls(raw.parse().choices[0].message)


def chat_streaming_response(c: Clients) -> ToolCalls:
    with c.openai.chat.completions.with_streaming_response.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS
    ) as response:
        return _chat_tool_calls(response.parse().choices[0].message)


def anthropic_raw_response(c: Clients) -> ToolCalls:
    raw = c.anthropic.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=64, messages=MESSAGES
    )
    return _tool_uses(raw.parse().content)


def anthropic_streaming_response_json(c: Clients) -> ToolCalls:
    # the caller reads the JSON itself and never lets the SDK parse it
    with c.anthropic.messages.with_streaming_response.create(
        model=CLAUDE, max_tokens=64, messages=MESSAGES
    ) as response:
        body = response.json()
    return [(b["name"], b["input"]) for b in body["content"] if b["type"] == "tool_use"]


async def achat_create(c: Clients) -> ToolCalls:
    answer = await c.async_openai.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS
    )
    return _chat_tool_calls(answer.choices[0].message)


async def achat_stream(c: Clients) -> ToolCalls:
    stream = await c.async_openai.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
    )
    return _chat_chunks([chunk async for chunk in stream])


async def achat_stream_helper(c: Clients) -> ToolCalls:
    helper = _sdk.chat_helper(c.async_openai)
    try:
        manager = helper(model=MODEL, messages=MESSAGES, tools=TOOLS)
    except ValueError as refused:  # some SDKs' async helper auto-parses only strict tools
        pytest.skip(f"this openai's async stream helper refuses non-strict tools: {refused}")
    async with manager as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    return _chat_tool_calls(final.choices[0].message)


async def aresponses_create(c: Clients) -> ToolCalls:
    responses = _sdk.surface(c.async_openai, "responses")
    answer = await responses.create(model=MODEL, input="find x")
    return _responses_tool_calls(answer.output)


async def aresponses_stream(c: Clients) -> ToolCalls:
    responses = _sdk.surface(c.async_openai, "responses")
    stream = await responses.create(model=MODEL, input="find x", stream=True)
    return _responses_tool_calls(_completed_output([event async for event in stream]))


async def achat_raw_response(c: Clients) -> ToolCalls:
    raw = await c.async_openai.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS
    )
    return _chat_tool_calls(raw.parse().choices[0].message)


async def aanthropic_create(c: Clients) -> ToolCalls:
    message = await c.async_anthropic.messages.create(
        model=CLAUDE, max_tokens=64, messages=MESSAGES
    )
    return _tool_uses(message.content)


async def aanthropic_stream(c: Clients) -> ToolCalls:
    events = await c.async_anthropic.messages.create(
        model=CLAUDE, max_tokens=64, messages=MESSAGES, stream=True
    )
    return _anthropic_events([event async for event in events])


async def aanthropic_stream_helper(c: Clients) -> ToolCalls:
    async with c.async_anthropic.messages.stream(
        model=CLAUDE, max_tokens=64, messages=MESSAGES
    ) as stream:
        async for _ in stream:
            pass
        message = await stream.get_final_message()
    return _tool_uses(message.content)


SYNC_SURFACES = [
    pytest.param(chat_create, "/v1/chat/completions", id="chat.completions.create"),
    pytest.param(chat_stream, "/v1/chat/completions", id="chat.completions.create-stream"),
    pytest.param(chat_stream_helper, "/v1/chat/completions", id="chat.completions.stream"),
    pytest.param(responses_create, "/v1/responses", id="responses.create"),
    pytest.param(responses_stream, "/v1/responses", id="responses.create-stream"),
    pytest.param(anthropic_create, "/v1/messages", id="messages.create"),
    pytest.param(anthropic_stream, "/v1/messages", id="messages.create-stream"),
    pytest.param(anthropic_stream_helper, "/v1/messages", id="messages.stream"),
    pytest.param(chat_raw_response, "/v1/chat/completions", id="chat-with_raw_response"),
    pytest.param(
        chat_streaming_response, "/v1/chat/completions", id="chat-with_streaming_response"
    ),
    pytest.param(anthropic_raw_response, "/v1/messages", id="messages-with_raw_response"),
    pytest.param(
        anthropic_streaming_response_json, "/v1/messages", id="messages-with_streaming_response"
    ),
]

ASYNC_SURFACES = [
    pytest.param(achat_create, "/v1/chat/completions", id="async-chat.completions.create"),
    pytest.param(achat_stream, "/v1/chat/completions", id="async-chat.completions.create-stream"),
    pytest.param(achat_stream_helper, "/v1/chat/completions", id="async-chat.completions.stream"),
    pytest.param(aresponses_create, "/v1/responses", id="async-responses.create"),
    pytest.param(aresponses_stream, "/v1/responses", id="async-responses.create-stream"),
    pytest.param(aanthropic_create, "/v1/messages", id="async-messages.create"),
    pytest.param(aanthropic_stream, "/v1/messages", id="async-messages.create-stream"),
    pytest.param(aanthropic_stream_helper, "/v1/messages", id="async-messages.stream"),
    pytest.param(achat_raw_response, "/v1/chat/completions", id="async-chat-with_raw_response"),
]


def ask(client: Any, content: str = "find x", **kwargs: Any) -> Any:
    kwargs.setdefault("model", MODEL)
    return client.chat.completions.create(messages=[{"role": "user", "content": content}], **kwargs)


async def aask(client: Any, content: str = "find x", **kwargs: Any) -> Any:
    kwargs.setdefault("model", MODEL)
    return await client.chat.completions.create(
        messages=[{"role": "user", "content": content}], **kwargs
    )


def assert_repeated_tool_trip(
    exc: GuardTripped, limit: int, tool: str = "search", arguments: str = '{"q":"x"}'
) -> None:
    assert isinstance(exc, LoopDetected)
    trip = exc.trip
    assert trip.guard == "max_repeated_tool_calls"
    assert trip.limit == limit
    assert trip.observed == limit
    assert dict(trip.details) == {"tool": tool, "arguments": arguments}


def tool_reply(name: str, **arguments: Any) -> Reply:
    return Reply(tool_calls=((name, arguments),))


def body_messages(request: WireRequest) -> Any:
    return request.body["messages"]


# -- max_repeated_tool_calls on every surface --------------------------------------------


@pytest.mark.parametrize(("surface", "path"), SYNC_SURFACES)
def test_third_identical_tool_call_is_paid_and_the_fourth_call_is_refused(
    fake: FakeProvider, clients: Clients, surface: Callable[[Clients], ToolCalls], path: str
) -> None:
    answers: list[ToolCalls] = []
    with pytest.raises(LoopDetected) as info, RunGuard(max_repeated_tool_calls=3) as guard:
        for _ in range(10):
            answers.append(surface(clients))
    # the SDK really handed the agent the same tool call three times
    assert answers == [[SEARCH]] * 3
    assert fake.wire_count == 3
    assert [r.path for r in fake.requests] == [path] * 3
    assert guard.usage.calls == 3
    assert info.value.trip is guard.trip
    assert_repeated_tool_trip(info.value, limit=3)


@pytest.mark.parametrize(("surface", "path"), ASYNC_SURFACES)
async def test_third_identical_tool_call_is_paid_and_the_fourth_async_call_is_refused(
    fake: FakeProvider, clients: Clients, surface: Callable[[Clients], Any], path: str
) -> None:
    answers: list[ToolCalls] = []
    with pytest.raises(LoopDetected) as info:
        async with RunGuard(max_repeated_tool_calls=3) as guard:
            for _ in range(10):
                answers.append(await surface(clients))
    assert answers == [[SEARCH]] * 3
    assert fake.wire_count == 3
    assert [r.path for r in fake.requests] == [path] * 3
    assert guard.usage.calls == 3
    assert_repeated_tool_trip(info.value, limit=3)


def test_refused_call_after_a_repeated_tool_call_is_not_retried_by_the_sdk(
    fake: FakeProvider,
) -> None:
    client = fake.openai()  # the SDK's default retries are on
    with pytest.raises(LoopDetected), RunGuard(max_repeated_tool_calls=1):
        ask(client)
        ask(client)
    assert fake.wire_count == 1


def test_stream_and_plain_calls_across_providers_count_together(
    fake: FakeProvider, clients: Clients
) -> None:
    # OpenAI sends the arguments as the text '{"q": "x"}', Anthropic as an object:
    # both are the same tool call.
    sequence = [(chat_stream, "/v1/chat/completions"), (anthropic_create, "/v1/messages")]
    if _sdk.has(clients.openai, "responses"):  # only the calls this SDK can make
        sequence.append((responses_stream, "/v1/responses"))
    sequence.append((anthropic_stream_helper, "/v1/messages"))
    answers: list[ToolCalls] = []
    with pytest.raises(LoopDetected) as info, RunGuard(max_repeated_tool_calls=3):
        for call, _ in sequence:
            answers.append(call(clients))
    assert answers == [[SEARCH]] * 3
    assert [r.path for r in fake.requests] == [path for _, path in sequence[:3]]
    assert_repeated_tool_trip(info.value, limit=3)


async def test_async_and_sync_clients_inside_one_guard_share_the_window(
    fake: FakeProvider, clients: Clients
) -> None:
    answers: list[ToolCalls] = []
    with pytest.raises(LoopDetected):
        async with RunGuard(max_repeated_tool_calls=3):
            answers.append(await aanthropic_stream(clients))
            answers.append(chat_create(clients))
            answers.append(await aresponses_create(clients))
            answers.append(responses_create(clients))
    assert answers == [[SEARCH]] * 3
    assert fake.wire_count == 3


def test_a_trip_on_the_last_call_of_a_stream_refuses_the_next_stream_before_sending(
    fake: FakeProvider, clients: Clients
) -> None:
    with RunGuard(max_repeated_tool_calls=2, raise_on_exit=False) as guard:
        chat_stream(clients)
        chat_stream(clients)
        assert guard.tripped
        with pytest.raises(LoopDetected):
            clients.openai.chat.completions.create(
                model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
            )
        with pytest.raises(LoopDetected):
            anthropic_stream(clients)
    assert fake.wire_count == 2


def test_the_latched_guard_refuses_calls_without_tool_calls_too(
    fake: FakeProvider, clients: Clients
) -> None:
    with RunGuard(max_repeated_tool_calls=2, raise_on_exit=False) as guard:
        chat_create(clients)
        chat_create(clients)
        fake.default = Reply(text="done")
        for other in ("something else", "and more"):
            with pytest.raises(LoopDetected) as info:
                ask(clients.openai, other)
            assert info.value.trip is guard.trip
    assert fake.wire_count == 2


# -- what counts as the same tool call ---------------------------------------------------


def test_same_arguments_in_another_key_order_are_the_same_tool_call(
    fake: FakeProvider, client: Any
) -> None:
    orders = itertools.cycle([{"q": "x", "n": 2}, {"n": 2, "q": "x"}])
    fake.responder = lambda request: Reply(tool_calls=(("search", next(orders)),))
    raw: list[str] = []
    with pytest.raises(LoopDetected) as info, RunGuard(max_repeated_tool_calls=2):
        for _ in range(5):
            answer = ask(client, tools=TOOLS)
            raw.append(answer.choices[0].message.tool_calls[0].function.arguments)
    # the wire really carried two different texts for the same arguments
    assert raw == ['{"q": "x", "n": 2}', '{"n": 2, "q": "x"}']
    assert fake.wire_count == 2
    assert_repeated_tool_trip(info.value, limit=2, arguments='{"n":2,"q":"x"}')


def test_nested_key_order_does_not_matter_over_the_wire(fake: FakeProvider, clients) -> None:
    fake.script(
        tool_reply("lookup", filters={"a": 1, "b": [1, 2]}, q="x"),
        tool_reply("lookup", q="x", filters={"b": [1, 2], "a": 1}),
    )
    with pytest.raises(LoopDetected) as info, RunGuard(max_repeated_tool_calls=2):
        for _ in range(3):
            anthropic_stream(clients)
    assert fake.wire_count == 2
    assert info.value.trip.details["arguments"] == '{"filters":{"a":1,"b":[1,2]},"q":"x"}'


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(tool_reply("search", q="x"), tool_reply("search", q="X"), id="value-case"),
        pytest.param(tool_reply("search", q="x"), tool_reply("search", q="x", p=1), id="extra-arg"),
        pytest.param(tool_reply("search", n=1), tool_reply("search", n="1"), id="int-vs-str"),
        pytest.param(tool_reply("search", q="x"), tool_reply("fetch", q="x"), id="other-tool"),
        pytest.param(tool_reply("search", q="x"), Reply(text="x"), id="text-answer"),
    ],
)
def test_different_tool_calls_are_not_repeats(
    fake: FakeProvider, client: Any, first: Reply, second: Reply
) -> None:
    fake.script(first, second, first, second)
    with RunGuard(max_repeated_tool_calls=2, raise_on_exit=False) as guard:
        ask(client)
        ask(client)
        assert not guard.tripped
        ask(client)  # the second sighting of ``first``: paid, then the guard latches
        assert guard.tripped
        with pytest.raises(LoopDetected):
            ask(client)
        guard_trip = guard.trip
    assert fake.wire_count == 3
    assert guard_trip is not None
    assert guard_trip.details["tool"] == first.tool_calls[0][0]


class WholeInputAtStart(FakeProvider):
    """Anthropic streams whose tool_use blocks open with their whole input, and no pieces.

    The API opens a block with an empty input and streams the JSON in pieces; some
    proxies put the whole input in the opening event instead.
    """

    def _respond(self, request: Any, wire: WireRequest, reply: Reply) -> Any:
        response = super()._respond(request, wire, reply)
        if response.headers.get("content-type") != "text/event-stream" or not reply.tool_calls:
            return response
        inputs = iter(args for _, args in reply.tool_calls)
        events = []
        for event in response.content.decode().split("\n\n"):
            name, _, data = event.partition("\ndata: ")
            if name == "event: content_block_delta" and "input_json_delta" in data:
                continue
            if name == "event: content_block_start" and '"tool_use"' in data:
                opened = json.loads(data)
                opened["content_block"]["input"] = dict(next(inputs))
                event = f"{name}\ndata: {json.dumps(opened)}"
            events.append(event)
        content = "\n\n".join(events).encode()
        return type(response)(200, content=content, headers=dict(response.headers))


def test_a_tool_input_given_whole_when_its_block_opens_is_read(clients: Clients) -> None:
    fake = WholeInputAtStart()
    fake.script(*(Reply(tool_calls=(("search", {"q": q}),)) for q in ("a", "b", "a", "b")))
    client = fake.anthropic(max_retries=0)
    seen = []
    with RunGuard(max_repeated_tool_calls=2, raise_on_exit=False) as guard:
        for _ in range(3):
            events = client.messages.create(
                model=CLAUDE, max_tokens=64, messages=MESSAGES, stream=True
            )
            seen.append(
                [
                    (e.content_block.name, e.content_block.input)
                    for e in events
                    if e.type == "content_block_start" and e.content_block.type == "tool_use"
                ]
            )
            if len(seen) == 2:
                assert not guard.tripped  # search(a) and search(b) are not one tool call
    assert seen == [[("search", {"q": "a"})], [("search", {"q": "b"})], [("search", {"q": "a"})]]
    assert guard.trip is not None and guard.trip.details["arguments"] == '{"q":"a"}'


def test_one_answer_asking_twice_for_the_same_tool_call_counts_once(
    fake: FakeProvider, client: Any
) -> None:
    fake.default = Reply(tool_calls=(SEARCH, SEARCH, ("fetch", {"url": "u"})))
    with pytest.raises(LoopDetected) as info, RunGuard(max_repeated_tool_calls=2) as guard:
        first = ask(client)
        assert len(first.choices[0].message.tool_calls) == 3
        assert not guard.tripped
        ask(client)
        ask(client)
    assert fake.wire_count == 2
    assert info.value.trip.observed == 2


def test_parallel_tool_calls_in_one_answer_are_each_tracked(
    fake: FakeProvider, clients: Clients
) -> None:
    fetch = ("fetch", {"url": "u"})
    fake.script(
        Reply(tool_calls=(SEARCH, fetch)),
        Reply(tool_calls=(("other", {}), fetch)),
    )
    with pytest.raises(LoopDetected) as info, RunGuard(max_repeated_tool_calls=2):
        for _ in range(3):
            anthropic_stream(clients)
    assert fake.wire_count == 2
    assert_repeated_tool_trip(info.value, limit=2, tool="fetch", arguments='{"url":"u"}')


def test_tool_call_without_arguments_repeats_over_a_stream(
    fake: FakeProvider, clients: Clients
) -> None:
    fake.default = Reply(tool_calls=(("now", {}),))
    with pytest.raises(LoopDetected) as info, RunGuard(max_repeated_tool_calls=2):
        for _ in range(3):
            assert chat_stream(clients) == [("now", {})]
    assert fake.wire_count == 2
    assert_repeated_tool_trip(info.value, limit=2, tool="now", arguments="{}")


def test_tool_call_normalises_key_order_and_whitespace() -> None:
    canonical = ToolCall.of("f", {"a": 2, "b": 1})
    assert ToolCall.of("f", '{"b": 1,  "a": 2}') == canonical
    assert ToolCall.of("f", '{\n  "a": 2,\n  "b": 1\n}') == canonical
    assert ToolCall.of("f", {"b": 1, "a": 2}) == canonical
    assert canonical.arguments == '{"a":2,"b":1}'
    assert ToolCall.of("f", '{"x": {"d": 1, "c": [3, {"z": 0, "y": 1}]}}') == ToolCall.of(
        "f", {"x": {"c": [3, {"y": 1, "z": 0}], "d": 1}}
    )


def test_tool_call_keeps_what_really_differs() -> None:
    assert ToolCall.of("f", {"a": 1}) != ToolCall.of("g", {"a": 1})
    assert ToolCall.of("f", {"a": 1}) != ToolCall.of("f", {"a": "1"})
    assert ToolCall.of("f", {"a": [1, 2]}) != ToolCall.of("f", {"a": [2, 1]})
    assert ToolCall.of("f", {"a": "x y"}) != ToolCall.of("f", {"a": "x  y"})


def test_tool_call_arguments_that_are_not_json_compare_with_spacing_collapsed() -> None:
    assert ToolCall.of("sh", "ls   -la\n/tmp ") == ToolCall.of("sh", "ls -la /tmp")
    assert ToolCall.of("sh", "ls -la /tmp") != ToolCall.of("sh", "ls -la /var")


# -- the window ---------------------------------------------------------------------------

FILLERS = {
    "other-tools": [tool_reply(f"other{i}", i=i) for i in range(1, 4)],
    "text-answers": [Reply(text=f"thinking {i}") for i in range(1, 4)],
}


@pytest.mark.parametrize("filler", sorted(FILLERS))
@pytest.mark.parametrize(
    ("window", "trips"),
    [(3, False), (4, False), (5, True), (20, True)],
)
def test_a_repeat_counts_only_while_the_first_sighting_is_in_the_window(
    fake: FakeProvider, client: Any, filler: str, window: int, trips: bool
) -> None:
    # answers: search(x), three others, search(x), then plain text
    fake.script(LOOPING, *FILLERS[filler], LOOPING)
    fake.default = Reply(text="done")
    with RunGuard(max_repeated_tool_calls=2, loop_window=window, raise_on_exit=False) as guard:
        for i in range(6):
            try:
                ask(client, f"step {i}")
            except LoopDetected:
                break
    if trips:
        assert fake.wire_count == 5
        assert guard.trip is not None
        assert guard.trip.guard == "max_repeated_tool_calls"
    else:
        assert fake.wire_count == 6
        assert guard.trip is None


def test_the_window_slides_over_a_long_run(fake: FakeProvider, client: Any) -> None:
    # search(x) every third answer: with a window of 5 it is seen at most twice
    replies = itertools.cycle([LOOPING, Reply(text="a"), Reply(text="b")])
    fake.responder = lambda request: next(replies)
    with RunGuard(max_repeated_tool_calls=3, loop_window=5) as guard:
        for i in range(60):
            ask(client, f"step {i}")
    assert fake.wire_count == 60
    assert not guard.tripped
    # with a window of 7 the third sighting (call 7) is inside it
    fake.reset()
    replies = itertools.cycle([LOOPING, Reply(text="a"), Reply(text="b")])
    with pytest.raises(LoopDetected), RunGuard(max_repeated_tool_calls=3, loop_window=7):
        for i in range(60):
            ask(client, f"step {i}")
    assert fake.wire_count == 7


# -- ordinary traffic never trips -----------------------------------------------------------


def test_hundred_calls_to_one_model_with_different_content_never_trip(
    fake: FakeProvider, client: Any
) -> None:
    fake.default = Reply(text="ok")
    with RunGuard(max_repeated_tool_calls=2, max_identical_requests=1, loop_window=100) as guard:
        for i in range(100):
            ask(client, f"question number {i}", tools=TOOLS, temperature=0)
    assert fake.wire_count == 100
    assert {r.model for r in fake.requests} == {MODEL}
    assert not guard.tripped


def test_a_conversation_growing_for_fifty_turns_never_trips(
    fake: FakeProvider, clients: Clients
) -> None:
    fake.default = Reply(text="sure")
    messages: list[dict[str, str]] = [{"role": "user", "content": "let us talk"}]
    with RunGuard(max_repeated_tool_calls=2, max_identical_requests=1) as guard:
        for turn in range(50):
            client = clients.openai if turn % 2 else clients.anthropic
            if turn % 2:
                answer = client.chat.completions.create(model=MODEL, messages=messages)
                text = answer.choices[0].message.content
            else:
                answer = client.messages.create(model=CLAUDE, max_tokens=64, messages=messages)
                text = answer.content[0].text
            messages = [
                *messages,
                {"role": "assistant", "content": text},
                {"role": "user", "content": f"and then {turn}?"},
            ]
    assert fake.wire_count == 50
    assert len(body_messages(fake.requests[-1])) == 1 + 2 * 49
    assert not guard.tripped


def test_one_tool_called_with_new_arguments_fifty_times_never_trips(
    fake: FakeProvider, clients: Clients
) -> None:
    numbers = itertools.count()
    fake.responder = lambda request: tool_reply("search", q=f"page {next(numbers)}")
    messages: list[dict[str, Any]] = [{"role": "user", "content": "read every page"}]
    seen = []
    with RunGuard(max_repeated_tool_calls=2, max_identical_requests=1) as guard:
        for _ in range(50):
            answer = clients.openai.chat.completions.create(
                model=MODEL, messages=messages, tools=TOOLS
            )
            call = answer.choices[0].message.tool_calls[0]
            seen.append(json.loads(call.function.arguments)["q"])
            messages = [
                *messages,
                answer.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "result"},
            ]
    assert len(set(seen)) == 50
    assert fake.wire_count == 50
    assert not guard.tripped


async def test_identical_limit_never_trips_when_the_content_differs_every_time(
    fake: FakeProvider, clients: Clients
) -> None:
    fake.default = Reply(text="ok")
    async with RunGuard(max_identical_requests=1, loop_window=50) as guard:
        for i in range(40):
            await aask(clients.async_openai, f"task {i}", tools=TOOLS)
            await clients.async_anthropic.messages.create(
                model=CLAUDE,
                max_tokens=64,
                system="you are helpful",
                messages=[{"role": "user", "content": f"task {i}"}],
            )
    assert fake.wire_count == 80
    assert not guard.tripped


def test_without_loop_limits_identical_looping_calls_are_not_refused(
    fake: FakeProvider, client: Any
) -> None:
    with RunGuard() as guard:
        for _ in range(30):
            ask(client)
    assert fake.wire_count == 30
    assert not guard.tripped


# -- max_identical_requests ------------------------------------------------------------------


def test_identical_requests_are_allowed_up_to_the_limit_and_the_next_is_refused(
    fake: FakeProvider, client: Any
) -> None:
    with pytest.raises(LoopDetected) as info, RunGuard(max_identical_requests=3) as guard:
        for _ in range(10):
            ask(client, tools=TOOLS)
    assert fake.wire_count == 3
    assert guard.usage.calls == 3
    trip = info.value.trip
    assert trip is guard.trip
    assert trip.guard == "max_identical_requests"
    assert trip.limit == 3
    assert trip.observed == 4
    assert re.fullmatch(r"[0-9a-f]{16}", trip.details["fingerprint"])


def test_identical_requests_are_refused_before_sending_even_as_a_stream(
    fake: FakeProvider, clients: Clients
) -> None:
    with pytest.raises(LoopDetected), RunGuard(max_identical_requests=2):
        chat_stream(clients)
        chat_stream(clients)
        clients.openai.chat.completions.create(
            model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True
        )
    assert fake.wire_count == 2


def test_requests_differing_only_in_sampling_settings_are_identical(
    fake: FakeProvider, client: Any
) -> None:
    with pytest.raises(LoopDetected), RunGuard(max_identical_requests=2):
        ask(client, temperature=0)
        ask(client, temperature=0.9, max_tokens=50)
        ask(client, top_p=0.5, max_tokens=10, seed=7)
    assert fake.wire_count == 2
    # the requests on the wire really did differ in their sampling settings
    assert fake.requests[0].body.get("temperature") == 0
    assert fake.requests[1].body.get("temperature") == 0.9


VARIATIONS = {
    "message": lambda c: ask(c, "find y", tools=TOOLS),
    "role": lambda c: c.chat.completions.create(
        model=MODEL, messages=[{**m, "role": "developer"} for m in MESSAGES], tools=TOOLS
    ),
    "name": lambda c: c.chat.completions.create(
        model=MODEL, messages=[{**m, "name": "ann"} for m in MESSAGES], tools=TOOLS
    ),
    "extra-message": lambda c: c.chat.completions.create(
        model=MODEL, messages=[*MESSAGES, {"role": "user", "content": "please"}], tools=TOOLS
    ),
    "tools": lambda c: ask(c, tools=[*TOOLS, {**TOOLS[0], "function": {"name": "fetch"}}]),
    "no-tools": lambda c: ask(c),
    "model": lambda c: ask(c, tools=TOOLS, model="gpt-4o"),
    "endpoint": lambda c: _sdk.surface(c, "responses").create(model=MODEL, input=MESSAGES),
}


@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_a_request_that_differs_in_content_is_not_identical(
    fake: FakeProvider, client: Any, variation: str
) -> None:
    with pytest.raises(LoopDetected), RunGuard(max_identical_requests=2) as guard:
        ask(client, tools=TOOLS)
        ask(client, tools=TOOLS)
        VARIATIONS[variation](client)  # differs: sent
        VARIATIONS[variation](client)  # its own second copy: sent
        assert not guard.tripped
        ask(client, tools=TOOLS)  # the third copy of the first request: refused
    assert fake.wire_count == 4


def _image_turn(data: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is in this picture?"},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            ],
        }
    ]


def _tool_turn(call_id: str) -> list[dict[str, Any]]:
    call = {"id": call_id, "type": "function", "function": {"name": "search", "arguments": "{}"}}
    return [
        *MESSAGES,
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "nothing found"},
    ]


# Parts the token estimate skips (binary data, identifiers, the tool choice) still make
# two requests different: a batch of pictures sent with one prompt is not a loop.
SKIPPED_BY_THE_COUNT = {
    "image": lambda c, i: c.chat.completions.create(model=MODEL, messages=_image_turn("AAAA" + i)),
    "tool_call_id": lambda c, i: c.chat.completions.create(
        model=MODEL, messages=_tool_turn(f"call_{i}"), tools=TOOLS
    ),
    "tool_choice": lambda c, i: ask(c, tools=TOOLS, tool_choice="auto" if i == "a" else "required"),
    "nesting": lambda c, i: c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "find x" if i == "a" else ["find x"]}],
    ),
}


@pytest.mark.parametrize("part", sorted(SKIPPED_BY_THE_COUNT))
def test_requests_differing_only_in_a_part_the_count_skips_are_not_identical(
    fake: FakeProvider, client: Any, part: str
) -> None:
    send = SKIPPED_BY_THE_COUNT[part]
    with pytest.raises(LoopDetected), RunGuard(max_identical_requests=1):
        send(client, "a")
        send(client, "b")  # differs only in that part: sent
        send(client, "a")  # the first again: refused
    assert fake.wire_count == 2
    assert fake.requests[0].body != fake.requests[1].body


def test_identical_anthropic_requests_include_the_system_prompt(
    fake: FakeProvider, clients: Clients
) -> None:
    def send(system: str) -> None:
        clients.anthropic.messages.create(
            model=CLAUDE, max_tokens=64, system=system, messages=MESSAGES
        )

    with pytest.raises(LoopDetected) as info, RunGuard(max_identical_requests=2):
        send("you are terse")
        send("you are terse")
        send("you are verbose")  # another system prompt: another request
        send("you are terse")
    assert fake.wire_count == 3
    assert [r.body["system"] for r in fake.requests] == [
        "you are terse",
        "you are terse",
        "you are verbose",
    ]
    assert info.value.trip.guard == "max_identical_requests"


async def test_identical_async_anthropic_streams_are_refused(
    fake: FakeProvider, clients: Clients
) -> None:
    with pytest.raises(LoopDetected):
        async with RunGuard(max_identical_requests=1):
            await aanthropic_stream(clients)
            await aanthropic_stream(clients)
    assert fake.wire_count == 1


def test_identical_responses_requests_compare_the_input(fake: FakeProvider, client: Any) -> None:
    responses = _sdk.surface(client, "responses")
    with pytest.raises(LoopDetected), RunGuard(max_identical_requests=2):
        responses.create(model=MODEL, input="find x", temperature=0.1)
        responses.create(model=MODEL, input="find x", temperature=0.7)
        responses.create(model=MODEL, input="find y")
        responses.create(model=MODEL, input="find x", instructions="be brief")
        responses.create(model=MODEL, input="find x")
    assert [r.body["input"] for r in fake.requests] == ["find x", "find x", "find y", "find x"]


def test_responses_requests_with_other_stored_prompts_or_conversations_are_not_identical(
    fake: FakeProvider, client: Any
) -> None:
    responses = _sdk.surface(client, "responses")
    for name in ("prompt", "conversation"):  # newer parameters
        _sdk.accepts(responses.create, name)
    summarise = {"id": "pmpt_summarise", "variables": {"text": "the report"}}
    with pytest.raises(LoopDetected), RunGuard(max_identical_requests=1):
        responses.create(model=MODEL, input="go", prompt=summarise)
        responses.create(model=MODEL, input="go", prompt={**summarise, "id": "pmpt_translate"})
        responses.create(model=MODEL, input="go", prompt={**summarise, "variables": {"text": "x"}})
        responses.create(model=MODEL, input="go", previous_response_id="resp_1")
        responses.create(model=MODEL, input="go", previous_response_id="resp_2")
        responses.create(model=MODEL, input="go", conversation="conv_1")
        responses.create(model=MODEL, input="go", prompt=summarise)  # the first one again
    assert fake.wire_count == 6


@pytest.mark.parametrize(("window", "sent"), [(3, 6), (20, 4)])
def test_identical_requests_count_only_within_the_window(
    fake: FakeProvider, client: Any, window: int, sent: int
) -> None:
    # A A B C A A A: with a window of 3 the early copies of A have left it by the
    # fifth call, so the seventh call (the third A in a row) is the one refused.
    contents = ["a", "a", "b", "c", "a", "a", "a"]
    with pytest.raises(LoopDetected), RunGuard(max_identical_requests=2, loop_window=window):
        for content in contents:
            ask(client, content)
    assert fake.wire_count == sent


class DownStore(MemoryStore):
    """A budget store that cannot be reached: every call through its budget is refused."""

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("store unreachable")


@pytest.mark.parametrize("window", [3, 20])
def test_a_request_a_shared_budget_refused_takes_no_place_in_the_window(
    fake: FakeProvider, client: Any, window: int
) -> None:
    # A B A are sent; C passes the identical-requests check but its budget refuses it,
    # so it is never sent. The last three requests sent hold A twice, so the next A
    # is refused, with a window just full (C's admission had pushed the first A out,
    # which must come back) or with room to spare.
    with RunGuard(max_identical_requests=2, loop_window=window, raise_on_exit=False) as guard:
        for content in ["a", "b", "a"]:
            ask(client, content)
        with (
            pytest.raises(BudgetUnavailable),
            RunGuard(budgets=[Budget("unreachable", max_calls=100, store=DownStore())]),
        ):
            ask(client, "c")
        with pytest.raises(LoopDetected):
            ask(client, "a")
    assert [r.body["messages"][-1]["content"] for r in fake.requests] == ["a", "b", "a"]
    assert guard.trip is not None and guard.trip.guard == "max_identical_requests"


def test_a_request_retried_after_its_budget_refused_it_is_not_a_repeat(
    fake: FakeProvider, client: Any
) -> None:
    with RunGuard(max_identical_requests=1, raise_on_exit=False) as guard:
        with (
            pytest.raises(BudgetUnavailable),
            RunGuard(budgets=[Budget("unreachable", max_calls=100, store=DownStore())]),
        ):
            ask(client)
        ask(client)  # the first copy never left: this one is the first sent
        with pytest.raises(LoopDetected):
            ask(client)
    assert fake.wire_count == 1
    assert guard.trip is not None and guard.trip.observed == 2


# Identical requests fired together (asyncio.gather, a thread pool) are in flight
# at once: each counts as soon as it is admitted, as every pre-call ceiling does.
async def test_identical_requests_in_flight_at_once_count_toward_the_limit(
    fake: FakeProvider, aclient: Any
) -> None:
    fake.default = Reply(text="ok", delay=0.05)  # the copies overlap on the wire

    async def one() -> bool:
        try:
            await aask(aclient)
        except LoopDetected:
            return False
        return True

    async with RunGuard(max_identical_requests=2, raise_on_exit=False):
        sent = await asyncio.gather(*(one() for _ in range(5)))
    assert fake.wire_count == 2
    assert sent.count(True) == 2


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_repeated_tool_calls", "max_identical_requests"])
def test_a_window_smaller_than_the_limit_is_rejected(field: str) -> None:
    with pytest.raises(ValueError, match="loop_window"):
        RunGuard(**{field: 5}, loop_window=3)
    with pytest.raises(ValueError, match="loop_window"):
        RunGuard(**{field: 21})  # the default window is 20
    RunGuard(**{field: 3}, loop_window=3)  # a window as large as the limit is fine
    RunGuard(**{field: 20})


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError), ("5", TypeError)],
)
def test_loop_window_must_be_a_positive_int(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="loop_window"):
        RunGuard(max_repeated_tool_calls=1, loop_window=value)
    with pytest.raises(error, match="loop_window"):
        RunGuard(loop_window=value)


@pytest.mark.parametrize("field", ["max_repeated_tool_calls", "max_identical_requests"])
@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-3, ValueError), (2.0, TypeError), (False, TypeError), ("3", TypeError)],
)
def test_loop_limits_must_be_positive_ints(field: str, value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=field):
        RunGuard(**{field: value})
    with pytest.raises(error, match=field):
        guarded(**{field: value})


# -- one window per guard invocation ------------------------------------------------------


def test_guarded_gives_every_invocation_a_fresh_window(fake: FakeProvider, client: Any) -> None:
    answered: list[int] = []

    @guarded(max_repeated_tool_calls=2)
    def agent() -> None:
        answered.append(0)
        while True:
            ask(client)
            answered[-1] += 1

    for invocation in (1, 2, 3):
        with pytest.raises(LoopDetected):
            agent()
        assert fake.wire_count == 2 * invocation
    assert answered == [2, 2, 2]


async def test_guarded_async_gives_every_invocation_a_fresh_window(
    fake: FakeProvider, aclient: Any
) -> None:
    @guarded(max_identical_requests=2)
    async def agent() -> None:
        while True:
            await aask(aclient)

    for invocation in (1, 2):
        with pytest.raises(LoopDetected):
            await agent()
        assert fake.wire_count == 2 * invocation


def test_one_guard_object_shared_by_two_runguards_keeps_separate_windows(
    fake: FakeProvider, client: Any
) -> None:
    shared = RepeatedToolCalls(2)
    with RunGuard(guards=[shared], raise_on_exit=False) as first:
        ask(client)
        with RunGuard(guards=[shared], raise_on_exit=False) as second:
            ask(client)  # the first RunGuard has now seen it twice: it latches
            assert first.tripped
            assert not second.tripped
    assert fake.wire_count == 2
    assert second.usage.calls == 1


# -- nesting -------------------------------------------------------------------------------


def test_inner_loop_limit_trips_while_the_outer_guard_sees_every_call(
    fake: FakeProvider, client: Any
) -> None:
    with RunGuard(name="outer") as outer:
        with (
            pytest.raises(LoopDetected) as info,
            RunGuard(max_repeated_tool_calls=2, name="inner") as inner,
        ):
            for _ in range(5):
                ask(client)
        assert info.value.trip is inner.trip
        assert info.value.trip.run == "inner"
        assert outer.usage.calls == 2
        assert not outer.tripped
        # outside the inner guard the same tool call is allowed again
        ask(client)
    assert fake.wire_count == 3
    assert outer.usage.calls == 3


def test_outer_loop_limit_refuses_inside_a_plain_inner_guard(
    fake: FakeProvider, client: Any
) -> None:
    with (
        pytest.raises(LoopDetected) as at_exit,
        RunGuard(max_repeated_tool_calls=2, name="outer") as outer,
    ):
        with RunGuard(name="inner") as inner:
            ask(client)
            ask(client)
            with pytest.raises(LoopDetected) as info:
                ask(client)  # refused here, inside the inner block
        assert not inner.tripped
        assert info.value.trip.run == "outer"
        assert info.value.trip is outer.trip
    # the swallowed refusal is raised again where the outer block ends
    assert at_exit.value.trip is outer.trip
    assert fake.wire_count == 2
    assert inner.usage.calls == 2


def test_outer_identical_limit_counts_requests_made_inside_a_plain_inner_guard(
    fake: FakeProvider, clients: Clients
) -> None:
    with (
        pytest.raises(LoopDetected) as info,
        RunGuard(max_identical_requests=2, name="outer") as outer,
    ):
        with RunGuard(name="inner"):
            anthropic_create(clients)
        with RunGuard(name="inner2"):
            anthropic_create(clients)
            anthropic_create(clients)
    assert info.value.trip is outer.trip
    assert info.value.trip.guard == "max_identical_requests"
    assert fake.wire_count == 2


def test_inner_and_outer_loop_limits_both_count(fake: FakeProvider, client: Any) -> None:
    with (
        pytest.raises(LoopDetected) as info,
        RunGuard(max_repeated_tool_calls=3, name="outer") as outer,
    ):
        with RunGuard(max_repeated_tool_calls=5, name="inner"):
            ask(client)
        with RunGuard(max_repeated_tool_calls=5, name="inner2"):
            for _ in range(5):
                ask(client)
    assert info.value.trip is outer.trip
    assert fake.wire_count == 3


# -- concurrency: each agent its own window --------------------------------------------------


def test_two_threads_with_their_own_guards_do_not_share_a_window(
    fake: FakeProvider, client: Any
) -> None:
    barrier = threading.Barrier(2, timeout=5)
    results: dict[int, tuple[int, Any]] = {}

    def agent(index: int) -> None:
        answered = 0
        try:
            with RunGuard(max_repeated_tool_calls=3, name=f"agent{index}"):
                for _ in range(3):
                    ask(client)
                    answered += 1
                    barrier.wait()  # both agents finish each round before the next
                ask(client)
                answered += 1
        except LoopDetected as exc:
            results[index] = (answered, exc.trip)
        except threading.BrokenBarrierError:  # the other agent was refused early
            results[index] = (answered, None)

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [0, 1]
    for index, (answered, trip) in results.items():
        assert answered == 3
        assert trip is not None
        assert trip.run == f"agent{index}"
        assert trip.observed == 3
    assert fake.wire_count == 6


async def test_two_tasks_with_their_own_guards_do_not_share_a_window(
    fake: FakeProvider, clients: Clients
) -> None:
    fake.default = Reply(tool_calls=(SEARCH,), delay=0.01)  # the tasks' calls overlap
    shared = RepeatedToolCalls(3)  # even one guard object keeps a window per RunGuard

    async def agent(surface: Callable[[Clients], Any]) -> int:
        answered = 0
        with pytest.raises(LoopDetected):
            async with RunGuard(guards=[shared]):
                for _ in range(10):
                    await surface(clients)
                    answered += 1
        return answered

    answered = await asyncio.gather(agent(achat_stream), agent(aanthropic_create))
    assert answered == [3, 3]
    assert fake.wire_count == 6
