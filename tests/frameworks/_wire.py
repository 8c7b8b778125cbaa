"""Helpers for the framework tests: HTTP clients wired to the fake, and the common assertion.

The frameworks build their own SDK clients, as in production; only the HTTP
layer under them is the fake's. ``FakeProvider`` has no public accessor for a
bare HTTP client, so this reuses the one a fake SDK client is built with
(``client._client`` is the openai/anthropic SDKs' own attribute) and, for
LiteLLM's own ``httpx`` calls, the fake's request handler.
"""

from __future__ import annotations

from typing import Any

from runguard import BudgetExceeded, RunGuard
from runguard.testing import FakeProvider, Reply


def openai_http(fake: FakeProvider, *, is_async: bool = False) -> Any:
    """An HTTP client of the kind the installed ``openai`` SDK takes, wired to ``fake``."""
    client = fake.async_openai() if is_async else fake.openai()
    return client._client


def anthropic_http(fake: FakeProvider, *, is_async: bool = False) -> Any:
    """An HTTP client of the kind the installed ``anthropic`` SDK takes, wired to ``fake``."""
    client = fake.async_anthropic() if is_async else fake.anthropic()
    return client._client


def plain_httpx(fake: FakeProvider, *, is_async: bool = False) -> Any:
    """A classic ``httpx`` client wired to ``fake`` (LiteLLM's own HTTP is ``httpx``)."""
    import httpx

    if is_async:
        return httpx.AsyncClient(transport=httpx.MockTransport(fake._handle_async))
    return httpx.Client(transport=httpx.MockTransport(fake._handle))


def assert_stopped_at(
    n: int,
    guard: RunGuard,
    fake: FakeProvider,
    reply: Reply,
    raised: BaseException | None = None,
) -> None:
    """Exactly ``n`` requests on the wire, the next refused, and the guard's figures match."""
    assert fake.wire_count == n, f"{fake.wire_count} requests reached the provider, not {n}"
    assert guard.usage.calls == fake.wire_count
    assert guard.tripped
    trip = guard.trip
    assert trip is not None
    assert (trip.guard, trip.limit, trip.observed) == ("max_calls", n, n + 1)
    assert guard.usage.input_tokens == n * reply.input_tokens
    assert guard.usage.output_tokens == n * reply.output_tokens
    assert guard.usage.estimated_calls == 0
    if raised is not None:
        assert isinstance(raised, BudgetExceeded), f"the user saw {raised!r}"
        assert raised.trip == trip
