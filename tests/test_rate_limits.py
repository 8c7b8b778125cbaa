"""429 storms and upstream budget refusals over the real ``openai`` and ``anthropic`` SDKs.

Ground truth is what reached the fake wire: ``fake.wire_count``, ``fake.requests``
(each logical call carries its own number in ``x-test-call``, which the SDK's
retries repeat), and the statuses the fake answered (the
scripted replies, or a :class:`Cycle` responder that records each answer). The
guards' own counters are compared with that, never used as the reference.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from typing import Any, Literal

import anthropic
import openai
import pytest

from runguard import (
    BudgetExceeded,
    GuardTripped,
    RateLimitStorm,
    RunGuard,
    UpstreamBudgetExceeded,
    guarded,
    propagate,
)
from runguard.providers import _stainless
from runguard.providers import anthropic as anthropic_adapter
from runguard.providers import openai as openai_adapter
from runguard.testing import FakeProvider, Reply, WireRequest

MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
MESSAGES = [{"role": "user", "content": "hi"}]
LIMIT = 5
CALLS = 20
SDK_ERRORS = (openai.APIStatusError, anthropic.APIStatusError)

#: every kind of call the storm tests drive (azure is an openai client on another path)
KINDS = ["openai", "openai-stream", "anthropic", "anthropic-stream", "azure"]

MLFLOW_GATEWAY_BUDGET = {
    "detail": (
        "Budget limit exceeded. Limit: $5.00 USD per 1 days. "
        "Budget resets at 2026-12-01T00:00:00Z. Request rejected."
    )
}
LITELLM_BUDGET = {
    "error": {
        "message": "Budget has been exceeded! Current cost: 5.1, Max budget: 5.0",
        "type": "budget_exceeded",
        "param": None,
        "code": "400",
    }
}
OPENAI_QUOTA = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}
ANTHROPIC_CREDIT = "Your credit balance is too low to access the Anthropic API."
#: numbers each logical call on the wire (older SDKs do not number their retries)
CALL_HEADER = "x-test-call"
_call_numbers = itertools.count()


# -- helpers ---------------------------------------------------------------------------


def make_client(fake: FakeProvider, kind: str, max_retries: int, is_async: bool = False) -> Any:
    if kind.startswith("anthropic"):
        factory = fake.async_anthropic if is_async else fake.anthropic
    elif kind == "azure":
        if is_async:
            raise AssertionError("no async azure client in FakeProvider")
        factory = fake.azure_openai
    else:
        factory = fake.async_openai if is_async else fake.openai
    return factory(max_retries=max_retries)


def call(client: Any, kind: str) -> None:
    """One LLM call of the given kind; a stream is read to its end."""
    stream = kind.endswith("-stream")
    number = {CALL_HEADER: str(next(_call_numbers))}
    if kind.startswith("anthropic"):
        result = client.messages.create(
            model=CLAUDE, max_tokens=16, messages=MESSAGES, stream=stream, extra_headers=number
        )
    else:
        result = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, stream=stream, extra_headers=number
        )
    if stream:
        for _ in result:
            pass


async def acall(client: Any, kind: str) -> None:
    stream = kind.endswith("-stream")
    number = {CALL_HEADER: str(next(_call_numbers))}
    if kind.startswith("anthropic"):
        result = await client.messages.create(
            model=CLAUDE, max_tokens=16, messages=MESSAGES, stream=stream, extra_headers=number
        )
    else:
        result = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, stream=stream, extra_headers=number
        )
    if stream:
        async for _ in result:
            pass


def outcome_of(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, RateLimitStorm):
        return "storm"
    if isinstance(exc, UpstreamBudgetExceeded):
        return "budget"
    if isinstance(exc, SDK_ERRORS):
        return f"sdk-{exc.status_code}"
    raise exc


def run_calls(client: Any, kind: str, n: int, fake: FakeProvider) -> list[tuple[str, int]]:
    """An agent loop that swallows failures: (outcome, requests on the wire after it) per call."""
    seen = []
    for _ in range(n):
        try:
            call(client, kind)
        except (GuardTripped, *SDK_ERRORS) as exc:
            seen.append((outcome_of(exc), fake.wire_count))
        else:
            seen.append(("ok", fake.wire_count))
    return seen


async def arun_calls(client: Any, kind: str, n: int, fake: FakeProvider) -> list[tuple[str, int]]:
    seen = []
    for _ in range(n):
        try:
            await acall(client, kind)
        except (GuardTripped, *SDK_ERRORS) as exc:
            seen.append((outcome_of(exc), fake.wire_count))
        else:
            seen.append(("ok", fake.wire_count))
    return seen


def logical_calls(fake: FakeProvider) -> int:
    """Logical calls that reached the wire: the call numbers :func:`call` sent."""
    return len({r.headers[CALL_HEADER] for r in fake.requests})


def expected_storm(max_retries: int, calls: int = CALLS) -> list[tuple[str, int]]:
    """Against an always-429 provider: what each call of the loop must see.

    Each call sends up to ``max_retries + 1`` attempts; the call that sends
    the ``LIMIT``-th one raises the storm, and nothing is sent after it.
    """
    per_call = max_retries + 1
    tripping = math.ceil(LIMIT / per_call)  # 1-based index of the call that trips
    before = [("sdk-429", per_call * i) for i in range(1, tripping)]
    return before + [("storm", LIMIT)] * (calls - len(before))


def mlflow_treats_as_rate_limit(exc: BaseException) -> bool:
    """MLflow's evaluation harness rule (``is_rate_limit_error``) for retrying an error.

    A class named ``RateLimitError``, a ``status_code`` (or ``response.status_code``)
    of 429, or "429" / "rate limit" anywhere in ``str(exc)``, case-insensitively.
    """
    if any(cls.__name__ == "RateLimitError" for cls in type(exc).__mro__):
        return True
    if getattr(exc, "status_code", None) == 429:
        return True
    if getattr(getattr(exc, "response", None), "status_code", None) == 429:
        return True
    text = str(exc).lower()
    return "429" in text or "rate limit" in text


def answer(status: int) -> Reply:
    """A reply with this status; an error asks the SDK to retry after 1 ms, as a 429 does."""
    return Reply(status=status, headers={"retry-after-ms": "1"} if status >= 400 else {})


class Cycle:
    """A responder answering the given statuses in a loop, recording each one it sent."""

    def __init__(self, *statuses: int) -> None:
        self._statuses = itertools.cycle(statuses)
        self._lock = threading.Lock()
        self.sent: list[int] = []

    def __call__(self, request: WireRequest) -> Reply:
        with self._lock:
            status = next(self._statuses)
            self.sent.append(status)
        return answer(status)


class OnlyOwnHeadersFake(FakeProvider):
    """A FakeProvider whose 429s carry only the headers the reply sets.

    FakeProvider adds ``retry-after-ms: 1`` to every 429 that does not set it
    (so that the SDKs retry fast); a provider that sends only ``retry-after``,
    or no wait at all, needs it gone.
    """

    def _respond(self, request: Any, wire: WireRequest, reply: Reply) -> Any:
        response = super()._respond(request, wire, reply)
        if "retry-after-ms" not in reply.headers and "retry-after-ms" in response.headers:
            del response.headers["retry-after-ms"]
        return response


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=Reply(input_tokens=7, output_tokens=3))


@pytest.fixture
def storm() -> FakeProvider:
    """A provider that answers every request 429."""
    return FakeProvider(default=Reply(status=429))


# -- a storm stops at exactly the limit on the wire ------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 1, 2, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_consecutive_429s_stop_at_exactly_the_limit_on_the_wire(
    storm: FakeProvider, kind: str, max_retries: int
) -> None:
    client = make_client(storm, kind, max_retries)
    with pytest.raises(RateLimitStorm) as at_exit, RunGuard(max_consecutive_429s=LIMIT) as guard:
        seen = run_calls(client, kind, CALLS, storm)
    assert storm.wire_count == LIMIT
    assert seen == expected_storm(max_retries)
    assert at_exit.value.trip is guard.trip  # the swallowed trip is raised where the block ends
    assert guard.trip is not None and guard.trip.guard == "max_consecutive_429s"
    assert guard.usage.rate_limited_attempts == storm.wire_count  # every answer was a 429
    assert guard.usage.calls == logical_calls(storm)


@pytest.mark.parametrize("max_retries", [0, 1, 2, 7])
@pytest.mark.parametrize("kind", ["openai", "openai-stream", "anthropic", "anthropic-stream"])
async def test_async_consecutive_429s_stop_at_exactly_the_limit_on_the_wire(
    storm: FakeProvider, kind: str, max_retries: int
) -> None:
    client = make_client(storm, kind, max_retries, is_async=True)
    with pytest.raises(RateLimitStorm), RunGuard(max_consecutive_429s=LIMIT) as guard:
        seen = await arun_calls(client, kind, CALLS, storm)
    assert storm.wire_count == LIMIT
    assert seen == expected_storm(max_retries)
    assert guard.usage.rate_limited_attempts == storm.wire_count


@pytest.mark.parametrize("max_retries", [0, 2, 7])
def test_total_429s_stop_at_exactly_the_limit_on_an_always_429_provider(
    storm: FakeProvider, max_retries: int
) -> None:
    client = make_client(storm, "openai", max_retries)
    with pytest.raises(RateLimitStorm), RunGuard(max_total_429s=LIMIT) as guard:
        seen = run_calls(client, "openai", CALLS, storm)
    assert storm.wire_count == LIMIT
    assert seen == expected_storm(max_retries)
    assert guard.trip is not None and guard.trip.guard == "max_total_429s"


@pytest.mark.parametrize("kind", ["openai", "anthropic-stream"])
def test_guarded_function_stops_a_storm_at_the_limit(storm: FakeProvider, kind: str) -> None:
    client = make_client(storm, kind, max_retries=2)
    seen: list[tuple[str, int]] = []

    @guarded(max_consecutive_429s=LIMIT)
    def agent() -> None:
        seen.extend(run_calls(client, kind, CALLS, storm))

    with pytest.raises(RateLimitStorm):
        agent()
    assert storm.wire_count == LIMIT
    assert seen == expected_storm(2)
    # each invocation gets a fresh guard: a second run may send again, and stops again
    with pytest.raises(RateLimitStorm):
        agent()
    assert storm.wire_count == 2 * LIMIT


async def test_guarded_async_function_stops_a_storm_at_the_limit(storm: FakeProvider) -> None:
    client = make_client(storm, "openai", max_retries=7, is_async=True)

    @guarded(max_consecutive_429s=LIMIT)
    async def agent() -> None:
        for _ in range(CALLS):
            with pytest.raises((RateLimitStorm, openai.RateLimitError)):
                await acall(client, "openai")

    with pytest.raises(RateLimitStorm):
        await agent()
    assert storm.wire_count == LIMIT


def test_a_tripped_storm_guard_refuses_later_calls_of_any_provider(storm: FakeProvider) -> None:
    openai_client = storm.openai(max_retries=7)
    anthropic_client = storm.anthropic(max_retries=7)
    with RunGuard(max_consecutive_429s=LIMIT, raise_on_exit=False) as guard:
        with pytest.raises(RateLimitStorm):
            call(openai_client, "openai")
        storm.default = Reply()  # the provider has recovered: it does not matter any more
        for kind in ("anthropic", "anthropic-stream", "openai-stream"):
            client = anthropic_client if kind.startswith("anthropic") else openai_client
            with pytest.raises(RateLimitStorm):
                call(client, kind)
    assert storm.wire_count == LIMIT
    assert guard.tripped


# -- what ends a streak, what the totals count --------------------------------------------


@pytest.mark.parametrize("max_retries", [0, 2])
def test_a_success_ends_the_consecutive_streak(max_retries: int) -> None:
    # 429, 429, 200 in a loop: never three 429s in a row, however the SDK retries
    cycle = Cycle(429, 429, 200)
    fake = FakeProvider(responder=cycle)
    client = fake.openai(max_retries=max_retries)
    with RunGuard(max_consecutive_429s=3) as guard:
        seen = run_calls(client, "openai", 12, fake)
    assert not guard.tripped
    assert {outcome for outcome, _ in seen} <= {"ok", "sdk-429"}
    assert "ok" in {outcome for outcome, _ in seen}
    assert len(cycle.sent) == fake.wire_count
    # 12 calls: each one attempt without retries, or 429, 429, 200 with two retries
    assert fake.wire_count == (36 if max_retries == 2 else 12)
    assert guard.usage.rate_limited_attempts == cycle.sent.count(429)
    assert cycle.sent.count(429) >= 8  # two in a row came up again and again


@pytest.mark.parametrize("max_retries", [0, 2, 7])
def test_another_error_status_ends_the_consecutive_streak(max_retries: int) -> None:
    # 500 is retried by the SDK like 429; it still breaks the run of 429s
    cycle = Cycle(429, 429, 500)
    fake = FakeProvider(responder=cycle)
    client = fake.openai(max_retries=max_retries)
    with RunGuard(max_consecutive_429s=3) as guard:
        seen = run_calls(client, "openai", 10, fake)
    assert not guard.tripped
    assert {outcome for outcome, _ in seen} <= {"sdk-429", "sdk-500"}
    assert fake.wire_count == 10 * (max_retries + 1)  # nothing stopped the SDK's retries
    assert guard.usage.rate_limited_attempts == cycle.sent.count(429)


def test_the_same_cycle_trips_when_the_limit_is_the_streak_it_reaches() -> None:
    # control for the two tests above: a streak of 2 is seen, and stopped at 2
    cycle = Cycle(429, 429, 200)
    fake = FakeProvider(responder=cycle)
    client = fake.openai(max_retries=2)
    with pytest.raises(RateLimitStorm), RunGuard(max_consecutive_429s=2):
        seen = run_calls(client, "openai", 5, fake)
    assert cycle.sent == [429, 429]
    assert [outcome for outcome, _ in seen] == ["storm"] * 5


def test_total_429s_count_across_successes() -> None:
    cycle = Cycle(429, 429, 200)
    fake = FakeProvider(responder=cycle)
    client = fake.openai(max_retries=2)
    with pytest.raises(RateLimitStorm) as at_exit, RunGuard(max_total_429s=LIMIT) as guard:
        seen = run_calls(client, "openai", 6, fake)
    # two calls succeed after two 429s each; the third call's first 429 is the fifth
    assert cycle.sent == [429, 429, 200, 429, 429, 200, 429]
    assert [outcome for outcome, _ in seen] == ["ok", "ok"] + ["storm"] * 4
    assert at_exit.value.trip.guard == "max_total_429s"
    assert guard.usage.rate_limited_attempts == cycle.sent.count(429)
    assert guard.usage.calls == logical_calls(fake) == 3


@pytest.mark.parametrize(
    "settings",
    [{"max_calls": 100}, {"max_consecutive_429s": 10}, {"max_total_429s": 10}],
    ids=["no-429-keyword", "consecutive", "total"],
)
def test_rate_limited_attempts_count_the_429s_that_reached_the_wire(
    settings: dict[str, int],
) -> None:
    statuses = [429, 200, 500, 429, 429, 200, 400, 429, 500, 500, 429, 200, 429, 429]
    fake = FakeProvider().script(*(answer(s) for s in statuses))
    client = fake.openai(max_retries=2)
    with RunGuard(**settings) as guard:
        seen = run_calls(client, "openai", 12, fake)
    assert not guard.tripped
    answered = statuses[: fake.wire_count]
    assert answered.count(429) >= 6  # the script was mostly used
    assert guard.usage.rate_limited_attempts == answered.count(429)
    assert guard.usage.calls == logical_calls(fake) == len(seen)


# -- Retry-After on the trip -------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="retry-after-ms"),
        pytest.param({"retry-after-ms": "250", "retry-after": "7"}, 0.25, id="ms-preferred"),
        pytest.param({"retry-after": "7"}, 7.0, id="retry-after-seconds"),
        pytest.param({"retry-after-ms": "soon", "retry-after": "7"}, 7.0, id="bad-ms-passed-over"),
        pytest.param({"retry-after-ms": "nan", "retry-after": "7"}, 7.0, id="nan-ms-passed-over"),
    ],
)
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_trip_records_status_and_retry_after_in_seconds(
    kind: str, headers: dict[str, str], expected: float
) -> None:
    fake = OnlyOwnHeadersFake(default=Reply(status=429, headers=headers))
    client = make_client(fake, kind, max_retries=3)  # the trip comes before any retry wait
    with pytest.raises(RateLimitStorm) as info, RunGuard(max_consecutive_429s=1):
        call(client, kind)
    assert fake.wire_count == 1
    assert info.value.trip.details["status"] == 429
    assert info.value.trip.details["retry_after"] == pytest.approx(expected)


def test_trip_records_retry_after_given_as_an_http_date() -> None:
    fake = OnlyOwnHeadersFake(
        default=Reply(
            status=429, headers={"retry-after": formatdate(time.time() + 3600, usegmt=True)}
        )
    )
    client = fake.openai(max_retries=0)
    with pytest.raises(RateLimitStorm) as info, RunGuard(max_consecutive_429s=1):
        call(client, "openai")
    assert fake.wire_count == 1
    # an HTTP date has whole seconds, and a little time passes before it is read
    assert 3590 < info.value.trip.details["retry_after"] <= 3601


def test_trip_has_no_retry_after_when_the_provider_asks_for_no_wait() -> None:
    fake = OnlyOwnHeadersFake(default=Reply(status=429))
    client = fake.openai(max_retries=0)
    with pytest.raises(RateLimitStorm) as info, RunGuard(max_consecutive_429s=1):
        call(client, "openai")
    assert fake.wire_count == 1
    assert info.value.trip.details["status"] == 429
    assert "retry_after" not in info.value.trip.details


def test_trip_records_the_retry_after_of_the_attempt_that_tripped() -> None:
    fake = FakeProvider().script(
        Reply(status=429, headers={"retry-after-ms": "2"}),
        Reply(status=429, headers={"retry-after-ms": "4"}),
        Reply(status=429, headers={"retry-after-ms": "6"}),
    )
    client = fake.openai(max_retries=5)
    with pytest.raises(RateLimitStorm) as info, RunGuard(max_consecutive_429s=3):
        call(client, "openai")
    assert fake.wire_count == 3
    assert info.value.trip.details["retry_after"] == pytest.approx(0.006)


# -- upstream budget refusals ------------------------------------------------------------

BUDGET_REFUSALS = [
    pytest.param(
        "openai",
        Reply(status=402, body={"error": {"message": "Payment Required"}}),
        "Payment Required",
        id="openai-402",
    ),
    pytest.param(
        "anthropic",
        Reply(status=402, error="Payment required"),
        "Payment required",
        id="anthropic-402",
    ),
    pytest.param(
        "openai",
        Reply(status=429, body=MLFLOW_GATEWAY_BUDGET),
        MLFLOW_GATEWAY_BUDGET["detail"],
        id="mlflow-gateway-429",
    ),
    pytest.param(
        "openai-stream",
        Reply(status=429, body=MLFLOW_GATEWAY_BUDGET),
        MLFLOW_GATEWAY_BUDGET["detail"],
        id="mlflow-gateway-429-stream",
    ),
    pytest.param(
        "openai",
        Reply(status=400, body=LITELLM_BUDGET),
        LITELLM_BUDGET["error"]["message"],
        id="litellm-400",
    ),
    pytest.param(
        "openai",
        Reply(status=429, body=OPENAI_QUOTA),
        OPENAI_QUOTA["error"]["message"],
        id="openai-insufficient-quota",
    ),
    pytest.param(
        "anthropic",
        Reply(status=400, error=ANTHROPIC_CREDIT),
        ANTHROPIC_CREDIT,
        id="anthropic-credit-balance",
    ),
    pytest.param(
        "anthropic-stream",
        Reply(status=400, error=ANTHROPIC_CREDIT),
        ANTHROPIC_CREDIT,
        id="anthropic-credit-balance-stream",
    ),
]


@pytest.mark.parametrize("keyword", ["max_consecutive_429s", "max_total_429s"])
@pytest.mark.parametrize(("kind", "refusal", "message"), BUDGET_REFUSALS)
def test_upstream_budget_refusal_trips_on_the_first_answer(
    kind: str, refusal: Reply, message: str, keyword: str
) -> None:
    fake = FakeProvider(default=refusal)
    client = make_client(fake, kind, max_retries=5)
    with pytest.raises(UpstreamBudgetExceeded) as info, RunGuard(**{keyword: LIMIT}) as guard:
        call(client, kind)
    assert fake.wire_count == 1
    exc = info.value
    assert isinstance(exc, BudgetExceeded)
    assert not isinstance(exc, RateLimitStorm)
    assert exc.trip.guard == "upstream_budget"
    assert exc.trip.details["status"] == refusal.status
    assert message in exc.trip.details["message"]
    assert guard.trip is exc.trip


def hooked_per_attempt(kind: str) -> bool:
    """Whether RunGuard hooks this SDK per HTTP attempt (else on its answers: older SDKs)."""
    package = "anthropic" if kind.startswith("anthropic") else "openai"
    adapter = anthropic_adapter if package == "anthropic" else openai_adapter
    return _stainless._per_attempt(package, adapter.attempt_method)[0]


@pytest.mark.parametrize(
    ("kind", "refusal", "message"),
    BUDGET_REFUSALS[:3] + [p for p in BUDGET_REFUSALS if str(p.values[0]).endswith("-stream")],
)
async def test_async_upstream_budget_refusal_trips_on_the_first_answer(
    kind: str, refusal: Reply, message: str
) -> None:
    max_retries = 2
    fake = FakeProvider(default=refusal)
    client = make_client(fake, kind, max_retries=max_retries, is_async=True)
    with pytest.raises(UpstreamBudgetExceeded) as info, RunGuard(max_consecutive_429s=LIMIT):
        await acall(client, kind)
    assert message in info.value.trip.details["message"]
    unread = kind.endswith("-stream") and refusal.status == 429
    if hooked_per_attempt(kind) or not unread:
        assert fake.wire_count == 1
    else:
        # An SDK without the per-attempt method drops an async stream's failed body
        # unread before each retry, so only the last attempt's says "budget"
        # (docs/sdk-versions.md).
        assert fake.wire_count == max_retries + 1


def test_upstream_budget_trip_latches_even_after_the_budget_resets() -> None:
    fake = FakeProvider().script(Reply(status=429, body=OPENAI_QUOTA))
    client = fake.openai(max_retries=5)
    with RunGuard(max_total_429s=100, raise_on_exit=False) as guard:
        with pytest.raises(UpstreamBudgetExceeded):
            call(client, "openai")
        for kind in ("openai", "openai-stream"):
            with pytest.raises(UpstreamBudgetExceeded):
                call(client, kind)  # the provider would answer 200 now
    assert fake.wire_count == 1
    assert guard.usage.rate_limited_attempts == 1


@pytest.mark.parametrize(
    ("kind", "error"),
    [("openai", openai.BadRequestError), ("anthropic", anthropic.BadRequestError)],
)
def test_an_ordinary_400_is_not_a_budget_refusal(
    fake: FakeProvider, kind: str, error: type
) -> None:
    fake.script(Reply(status=400, error="max_tokens is too large: 100000"))
    client = make_client(fake, kind, max_retries=5)
    with RunGuard(max_consecutive_429s=LIMIT) as guard:
        with pytest.raises(error):
            call(client, kind)
        assert fake.wire_count == 1
        assert not guard.tripped
        call(client, kind)  # the next call goes out
    assert fake.wire_count == 2


@pytest.mark.parametrize(
    ("kind", "error"),
    [("openai", openai.RateLimitError), ("anthropic", anthropic.RateLimitError)],
)
def test_an_ordinary_429_is_not_a_budget_refusal(
    fake: FakeProvider, kind: str, error: type
) -> None:
    fake.script(Reply(status=429, error="Rate limit reached for requests per min (RPM)"))
    client = make_client(fake, kind, max_retries=0)
    with RunGuard(max_consecutive_429s=LIMIT) as guard:
        with pytest.raises(error):
            call(client, kind)
        assert not guard.tripped
        assert guard.usage.rate_limited_attempts == 1
        call(client, kind)
    assert fake.wire_count == 2


@pytest.mark.parametrize("settings", [{}, {"max_calls": 100}], ids=["no-limits", "max-calls"])
@pytest.mark.parametrize(("kind", "refusal", "message"), BUDGET_REFUSALS)
def test_budget_refusal_is_left_to_the_sdk_without_a_429_keyword(
    kind: str, refusal: Reply, message: str, settings: dict[str, int]
) -> None:
    fake = FakeProvider(default=refusal)
    client = make_client(fake, kind, max_retries=3)
    with RunGuard(**settings) as guard, pytest.raises(SDK_ERRORS) as info:
        call(client, kind)
    assert info.value.status_code == refusal.status
    # the SDKs retry a 429 (and not a 400 or a 402) when nothing stops them
    assert fake.wire_count == (4 if refusal.status == 429 else 1)
    assert not guard.tripped


# -- our exceptions never look retryable ---------------------------------------------------


def real_trips() -> list[GuardTripped]:
    """RateLimitStorm and UpstreamBudgetExceeded, raised by real trips."""
    trips: list[GuardTripped] = []
    cases: list[tuple[str, Reply, dict[str, Any]]] = [
        ("openai", Reply(status=429), {"max_consecutive_429s": 3}),
        ("openai-stream", Reply(status=429), {"max_total_429s": 4}),
        ("anthropic", Reply(status=429), {"max_consecutive_429s": 3}),
        ("openai", Reply(status=429), {"max_total_429s": 429, "name": "Rate Limit 429 bot"}),
        ("openai", Reply(status=429, body=OPENAI_QUOTA), {"max_consecutive_429s": 3}),
        ("openai", Reply(status=429, body=MLFLOW_GATEWAY_BUDGET), {"max_total_429s": 3}),
        ("openai", Reply(status=400, body=LITELLM_BUDGET), {"max_total_429s": 3}),
        ("anthropic", Reply(status=400, error=ANTHROPIC_CREDIT), {"max_consecutive_429s": 3}),
        ("anthropic", Reply(status=402, error="Payment required"), {"max_consecutive_429s": 3}),
    ]
    for kind, reply, settings in cases:
        fake = FakeProvider(default=reply)
        client = make_client(fake, kind, max_retries=2)
        with RunGuard(raise_on_exit=False, **settings):
            for _ in range(500):
                try:
                    call(client, kind)
                except GuardTripped as exc:
                    trips.append(exc)
                    break
                except SDK_ERRORS:
                    pass
    return trips


def test_storm_and_budget_exceptions_do_not_look_retryable_to_mlflow() -> None:
    trips = real_trips()
    assert {type(t) for t in trips} == {RateLimitStorm, UpstreamBudgetExceeded}
    assert len(trips) == 9
    for exc in trips:
        assert not mlflow_treats_as_rate_limit(exc), str(exc)


def test_the_mlflow_rule_does_match_the_sdks_own_429_errors(storm: FakeProvider) -> None:
    # control: the rule the test above applies is not trivially False
    for kind, error in (("openai", openai.RateLimitError), ("anthropic", anthropic.RateLimitError)):
        with pytest.raises(error) as info:
            call(make_client(storm, kind, max_retries=0), kind)
        assert mlflow_treats_as_rate_limit(info.value)


@pytest.mark.parametrize("exception", [RateLimitStorm, UpstreamBudgetExceeded])
def test_storm_and_budget_exceptions_are_not_sdk_errors(exception: type) -> None:
    assert issubclass(exception, GuardTripped)
    for sdk_error in (
        openai.OpenAIError,
        openai.APIError,
        openai.APIStatusError,
        openai.RateLimitError,
        anthropic.AnthropicError,
        anthropic.APIError,
        anthropic.APIStatusError,
        anthropic.RateLimitError,
    ):
        assert not issubclass(exception, sdk_error), sdk_error


def test_the_sdk_does_not_retry_a_storm_trip(storm: FakeProvider) -> None:
    # both SDKs retry what they think is transient; the trip must end the call at once
    for kind in ("openai", "anthropic"):
        storm.reset()
        client = make_client(storm, kind, max_retries=9)
        with pytest.raises(RateLimitStorm), RunGuard(max_consecutive_429s=1):
            call(client, kind)
        assert storm.wire_count == 1, kind


# -- nesting -------------------------------------------------------------------------------


def test_inner_storm_guard_trips_and_the_outer_guard_is_charged(fake: FakeProvider) -> None:
    fake.script(*[Reply(status=429)] * 3)  # then the provider recovers
    client = fake.openai(max_retries=1)
    with RunGuard(max_calls=100, name="outer") as outer:
        with pytest.raises(RateLimitStorm) as info, RunGuard(max_consecutive_429s=3, name="inner"):
            seen = run_calls(client, "openai", 5, fake)
        assert info.value.trip.run == "inner"
        assert fake.wire_count == 3
        assert seen == [("sdk-429", 2)] + [("storm", 3)] * 4
        assert not outer.tripped
        assert outer.usage.rate_limited_attempts == 3
        assert outer.usage.calls == logical_calls(fake) == 2
        call(client, "openai")  # the outer guard still lets calls through
    assert fake.wire_count == 4
    assert outer.usage.calls == logical_calls(fake) == 3
    assert outer.usage.rate_limited_attempts == 3


def test_outer_storm_guard_trips_inside_an_inner_guard_without_the_limit(
    storm: FakeProvider,
) -> None:
    client = storm.openai(max_retries=7)
    with (
        pytest.raises(RateLimitStorm) as at_exit,
        RunGuard(max_consecutive_429s=3, name="outer") as outer,
    ):
        with pytest.raises(RateLimitStorm) as info, RunGuard(max_calls=100, name="inner") as inner:
            call(client, "openai")
        assert info.value.trip.run == "outer"
        assert storm.wire_count == 3
        assert not inner.tripped
        assert inner.usage.rate_limited_attempts == 3
        with pytest.raises(RateLimitStorm):
            call(client, "openai-stream")
    assert at_exit.value.trip is outer.trip
    assert storm.wire_count == 3


# -- concurrency ---------------------------------------------------------------------------

WORKERS = 8


@pytest.mark.parametrize("scope", ["context", "process"])
def test_threads_stop_sending_once_the_storm_trips(scope: Literal["context", "process"]) -> None:
    fake = FakeProvider(default=Reply(status=429, delay=0.005))  # attempts overlap
    client = fake.openai(max_retries=2)
    barrier = threading.Barrier(WORKERS)

    def worker() -> list[tuple[str, int]]:
        barrier.wait(timeout=30)
        return run_calls(client, "openai", 10, fake)

    with (
        pytest.raises(RateLimitStorm),
        RunGuard(max_consecutive_429s=LIMIT, scope=scope) as guard,
    ):
        work = propagate(worker) if scope == "context" else worker
        with ThreadPoolExecutor(WORKERS) as pool:
            results = [f.result() for f in [pool.submit(work) for _ in range(WORKERS)]]
        settled = fake.wire_count
        with pytest.raises(RateLimitStorm):
            call(client, "openai")
        assert fake.wire_count == settled
    # the 5th 429 stops everything; only attempts already in flight may still land
    assert LIMIT <= fake.wire_count <= LIMIT + WORKERS - 1
    for seen in results:
        outcomes = [outcome for outcome, _ in seen]
        assert outcomes[-1] == "storm"
        first = outcomes.index("storm")
        assert set(outcomes[first:]) == {"storm"}
    assert guard.usage.rate_limited_attempts == fake.wire_count


async def test_tasks_stop_sending_once_the_storm_trips() -> None:
    fake = FakeProvider(default=Reply(status=429, delay=0.005))
    client = fake.async_openai(max_retries=2)
    with pytest.raises(RateLimitStorm), RunGuard(max_consecutive_429s=LIMIT) as guard:
        results = await asyncio.gather(
            *(arun_calls(client, "openai", 10, fake) for _ in range(WORKERS))
        )
        settled = fake.wire_count
        with pytest.raises(RateLimitStorm):
            await acall(client, "openai")
        assert fake.wire_count == settled
    assert LIMIT <= fake.wire_count <= LIMIT + WORKERS - 1
    for seen in results:
        outcomes = [outcome for outcome, _ in seen]
        assert outcomes[-1] == "storm"
        first = outcomes.index("storm")
        assert set(outcomes[first:]) == {"storm"}
    assert guard.usage.rate_limited_attempts == fake.wire_count


async def test_a_pending_sdk_retry_is_not_sent_once_another_task_tripped() -> None:
    # The first call's 429 asks for a 0.5 s wait before its retry; meanwhile another task
    # brings the streak to the limit. The waiting retry must not go out. (Had the other
    # task been slower than the wait, the retry would be the third 429 and trip itself:
    # three requests on the wire either way.)
    fake = FakeProvider(default=Reply(status=429))
    fake.script(Reply(status=429, headers={"retry-after-ms": "500"}))
    waiting = fake.async_openai(max_retries=2)
    storming = fake.async_openai(max_retries=0)

    async def storm_after_the_first_attempt() -> list[tuple[str, int]]:
        while fake.wire_count < 1:
            await asyncio.sleep(0.001)
        return await arun_calls(storming, "openai", 3, fake)

    with pytest.raises(RateLimitStorm), RunGuard(max_consecutive_429s=3):
        first, other = await asyncio.gather(
            arun_calls(waiting, "openai", 1, fake), storm_after_the_first_attempt()
        )
    assert fake.wire_count == 3
    assert first == [("storm", 3)]
    assert other[-1] == ("storm", 3)


def test_a_pending_sdk_retry_is_not_sent_once_another_thread_tripped() -> None:
    fake = FakeProvider(default=Reply(status=429))
    fake.script(Reply(status=429, headers={"retry-after-ms": "500"}))
    waiting = fake.openai(max_retries=2)
    storming = fake.openai(max_retries=0)

    def storm_after_the_first_attempt() -> list[tuple[str, int]]:
        while fake.wire_count < 1:
            time.sleep(0.001)
        return run_calls(storming, "openai", 3, fake)

    with (
        pytest.raises(RateLimitStorm),
        RunGuard(max_consecutive_429s=3),
        ThreadPoolExecutor(2) as pool,
    ):
        first = pool.submit(propagate(run_calls), waiting, "openai", 1, fake)
        other = pool.submit(propagate(storm_after_the_first_attempt))
        first_seen, other_seen = first.result(), other.result()
    assert fake.wire_count == 3
    assert first_seen == [("storm", 3)]
    assert other_seen[-1] == ("storm", 3)


# -- calls admitted before a trip ------------------------------------------------------


def by_content(replies: dict[str, list[Reply]]) -> Any:
    """A responder answering each request by its last message, from its own queue."""
    queues = {key: list(value) for key, value in replies.items()}
    lock = threading.Lock()

    def respond(wire: WireRequest) -> Reply:
        content = wire.body["messages"][-1]["content"]
        with lock:
            queue = queues[content]
            return queue.pop(0) if len(queue) > 1 else queue[0]

    return respond


async def test_a_ceiling_trip_lets_an_admitted_call_retry_its_error() -> None:
    # "slow" is admitted, then max_calls trips while its first attempt is out;
    # that attempt's 500 must be retried by the SDK as usual, not turned into the trip.
    fake = FakeProvider(
        responder=by_content(
            {
                "slow": [Reply(status=500, delay=0.3, headers={"retry-after-ms": "1"}), Reply()],
                "fast": [Reply()],
            }
        )
    )
    client = fake.async_openai(max_retries=2)

    async def ask(content: str) -> Any:
        messages = [{"role": "user", "content": content}]
        return await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)

    with RunGuard(max_calls=2, raise_on_exit=False) as guard:
        slow = asyncio.create_task(ask("slow"))
        await asyncio.sleep(0.05)  # "slow" is admitted and on the wire
        await ask("fast")
        with pytest.raises(BudgetExceeded):
            await ask("fast")  # the third call: refused, the guard latches
        answer = await slow
    assert answer.choices[0].message.content == "ok"
    slow_attempts = [r for r in fake.requests if r.body["messages"][-1]["content"] == "slow"]
    assert len(slow_attempts) == 2  # the 500, then the retry that succeeded
    assert guard.tripped


@pytest.mark.parametrize("refusal", ["storm", "budget"])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_call_admitted_before_a_ceiling_trip_still_stops_at_the_storm_limit(
    kind: str, refusal: str
) -> None:
    # max_calls latches the guard while a call's first attempt is out. The guard's
    # trip is then the ceiling's, but that call's 429s must still be judged: its
    # retries stop at the limit (or at the first budget refusal), not at max_retries.
    latched = threading.Event()
    body = MLFLOW_GATEWAY_BUDGET if refusal == "budget" else None

    def respond(wire: WireRequest) -> Reply:
        latched.wait(10)  # answers only once the ceiling has tripped
        return Reply(status=429, body=body)

    fake = FakeProvider(responder=respond)
    client = make_client(fake, kind, max_retries=8)
    with (
        RunGuard(max_calls=1, max_consecutive_429s=3, raise_on_exit=False) as guard,
        ThreadPoolExecutor(1) as pool,
    ):
        first = pool.submit(propagate(run_calls), client, kind, 1, fake)
        while fake.wire_count < 1:  # admitted, its first attempt on the wire
            time.sleep(0.001)
        with pytest.raises(BudgetExceeded):
            call(client, kind)  # the second call: refused by max_calls, nothing sent
        latched.set()
        seen = first.result(timeout=30)
    sent = 3 if refusal == "storm" else 1
    assert seen == [(refusal, sent)]
    assert fake.wire_count == sent
    assert guard.trip is not None and guard.trip.guard == "max_calls"  # the first trip


async def test_a_success_in_flight_when_a_storm_trips_is_returned_and_charged() -> None:
    fake = FakeProvider(
        responder=by_content(
            {
                "slow": [Reply(delay=0.3, input_tokens=1000, output_tokens=100)],
                "storm": [Reply(status=429)],
            }
        )
    )
    client = fake.async_openai(max_retries=0)

    async def ask(content: str) -> Any:
        messages = [{"role": "user", "content": content}]
        return await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)

    with RunGuard(max_consecutive_429s=2, raise_on_exit=False) as guard:
        slow = asyncio.create_task(ask("slow"))
        await asyncio.sleep(0.05)
        with pytest.raises(openai.RateLimitError):
            await ask("storm")
        with pytest.raises(RateLimitStorm):
            await ask("storm")  # the second 429 in a row trips the guard
        answer = await slow  # paid for: returned, not thrown away
    assert answer.usage is not None and answer.usage.prompt_tokens == 1000
    usage = guard.usage
    assert usage.input_tokens >= 1000 and usage.output_tokens >= 100
    assert usage.estimated_calls == 0
    assert fake.wire_count == 3
