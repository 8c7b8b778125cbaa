"""LiteLLM's Python SDK: counted where it calls the ``openai`` SDK, not where it uses its own HTTP.

``litellm.completion(model="openai/...")`` builds an ``openai.OpenAI`` client
and calls it, so RunGuard sees, counts and refuses those calls. LiteLLM wraps
the refusal: the caller gets ``litellm.InternalServerError`` whose message is
RunGuard's, while the guard records the trip (and re-raises it on exit if
the caller swallows the error).

Other providers, Anthropic among them, go through LiteLLM's own ``httpx``
handler and are NOT seen: the ``test_gap_*`` tests pin that current
behaviour, so a change (for better or worse) shows up here.

LiteLLM's HTTP is wired to the fake through its public hooks:
``litellm.client_session`` / ``aclient_session`` (the ``httpx`` clients it
hands to the ``openai`` SDK) and ``client=HTTPHandler(...)`` for its own HTTP.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download

import pytest
from _wire import assert_stopped_at, plain_httpx

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply

litellm = pytest.importorskip("litellm")
http_handler = pytest.importorskip("litellm.llms.custom_httpx.http_handler")

N = 3
REPLY = Reply(text="It ships on Monday.", input_tokens=80, output_tokens=6)
MESSAGES = [{"role": "user", "content": "Where is my order?"}]
OPENAI = {
    "model": "openai/gpt-4o-mini",
    "api_key": "test-key",
    "api_base": "http://runguard.fake/v1",
}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProvider]:
    fake = FakeProvider(default=REPLY)
    monkeypatch.setattr(litellm, "client_session", plain_httpx(fake))
    monkeypatch.setattr(litellm, "aclient_session", plain_httpx(fake, is_async=True))
    monkeypatch.setattr(litellm, "suppress_debug_info", True)
    # LiteLLM caches the openai clients it builds; start each test from a clean cache
    cache = getattr(litellm, "in_memory_llm_clients_cache", None)
    if cache is not None:
        cache.flush_cache()
    yield fake
    if cache is not None:
        cache.flush_cache()


def assert_wrapped_refusal(error: BaseException, guard: RunGuard) -> None:
    """What a LiteLLM caller sees when the guard refuses a call."""
    assert isinstance(error, litellm.InternalServerError)
    assert not isinstance(error, BudgetExceeded)
    assert "RunGuard: max_calls tripped" in str(error)
    assert guard.trip is not None and guard.trip.guard == "max_calls"


def test_openai_completion_loop_is_stopped_at_the_bar(fake: FakeProvider) -> None:
    answers: list[str] = []
    guard = RunGuard(max_calls=N)
    with pytest.raises(litellm.InternalServerError) as caught, guard:
        for _ in range(N + 5):
            answers.append(
                litellm.completion(messages=MESSAGES, **OPENAI).choices[0].message.content
            )
    assert answers == [REPLY.text] * N
    assert fake.count("/v1/chat/completions") == N
    assert_wrapped_refusal(caught.value, guard)
    assert_stopped_at(N, guard, fake, REPLY)


def test_a_swallowed_refusal_is_raised_again_by_the_guard(fake: FakeProvider) -> None:
    """A loop that catches LiteLLM's error and carries on: the latched guard still ends it."""
    errors: list[Exception] = []
    guard = RunGuard(max_calls=N)
    with pytest.raises(BudgetExceeded) as caught, guard:
        for _ in range(N + 5):
            try:
                litellm.completion(messages=MESSAGES, **OPENAI)
            except litellm.InternalServerError as exc:
                errors.append(exc)
    assert len(errors) == 5  # every later call refused too, none sent
    assert_stopped_at(N, guard, fake, REPLY, caught.value)


async def test_openai_acompletion_loop_is_stopped_at_the_bar(fake: FakeProvider) -> None:
    guard = RunGuard(max_calls=N)
    with pytest.raises(litellm.InternalServerError) as caught:
        async with guard:
            for _ in range(N + 5):
                await litellm.acompletion(messages=MESSAGES, **OPENAI)
    assert_wrapped_refusal(caught.value, guard)
    assert_stopped_at(N, guard, fake, REPLY)


def stream_text(**options: Any) -> str:
    stream = litellm.completion(messages=MESSAGES, stream=True, max_tokens=100, **options)
    # with include_usage, the last chunk carries the usage and no choices
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_openai_stream_loop_with_include_usage_is_stopped_at_the_bar(fake: FakeProvider) -> None:
    texts: list[str] = []
    guard = RunGuard(max_calls=N)
    with pytest.raises(litellm.InternalServerError) as caught, guard:
        for _ in range(N + 5):
            texts.append(stream_text(stream_options={"include_usage": True}, **OPENAI))
    assert texts == [REPLY.text] * N
    assert_wrapped_refusal(caught.value, guard)
    assert_stopped_at(N, guard, fake, REPLY)


def test_gap_openai_stream_without_include_usage_is_charged_its_worst_case(
    fake: FakeProvider,
) -> None:
    """Current behaviour: counted, but the tokens are RunGuard's estimate, not the reply's.

    LiteLLM calls ``with_raw_response``, and RunGuard leaves raw streams alone: it
    does not add ``stream_options.include_usage``, so the stream carries no usage
    and RunGuard charges the call's worst case (``max_tokens`` output).
    """
    with RunGuard(max_calls=N) as guard:
        assert stream_text(**OPENAI) == REPLY.text
    assert fake.wire_count == guard.usage.calls == 1
    assert "stream_options" not in fake.requests[0].body
    assert guard.usage.estimated_calls == 1
    assert guard.usage.output_tokens == 100  # max_tokens, not the reply's 6


def anthropic_completion(handler: Any) -> Any:
    return litellm.completion(
        model="anthropic/claude-haiku-4-5",
        messages=MESSAGES,
        api_key="test-key",
        api_base="http://runguard.fake",
        max_tokens=64,
        client=handler,
    )


def test_gap_anthropic_models_bypass_runguard(fake: FakeProvider) -> None:
    """Current behaviour: ``anthropic/...`` is LiteLLM's own HTTP; nothing is counted or refused."""
    handler = http_handler.HTTPHandler(client=plain_httpx(fake))
    with RunGuard(max_calls=1) as guard:
        answers = [anthropic_completion(handler) for _ in range(N)]
    assert [a.choices[0].message.content for a in answers] == [REPLY.text] * N
    assert fake.count("/v1/messages") == N  # all of them sent, over max_calls=1
    assert guard.usage.calls == 0
    assert not guard.tripped


def test_gap_litellms_own_http_handler_for_openai_bypasses_runguard(
    fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Current behaviour: with ``EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER`` set, ``openai/...``
    also goes through LiteLLM's own HTTP, and is not seen."""
    monkeypatch.setenv("EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER", "true")
    handler = http_handler.HTTPHandler(client=plain_httpx(fake))
    with RunGuard(max_calls=1) as guard:
        for _ in range(N):
            litellm.completion(messages=MESSAGES, client=handler, **OPENAI)
    assert fake.count("/v1/chat/completions") == N
    assert guard.usage.calls == 0
    assert not guard.tripped
