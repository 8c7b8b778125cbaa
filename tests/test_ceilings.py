"""The fused ceiling check agrees with its members, call for call.

``guards.ceiling.Ceilings`` restates the sums of each keyword ceiling so that
the five run as one comparison on every call. These properties pin the two
together: over any totals, reservations and requests, the fused check refuses
exactly when a member would, with that member's trip.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from runguard._records import CallRequest, CallResult, Usage
from runguard.guards.ceiling import Ceiling, Ceilings, checks

METRICS = ["calls", "input_tokens", "output_tokens", "total_tokens", "cost_usd"]

# Small amounts against limits up to about their sums, so that sums land on,
# just under and just over the limits often.
counts = st.integers(0, 4)
dollars = st.integers(0, 4).map(lambda quarters: quarters / 4)
count_limits = st.integers(0, 14)
dollar_limits = st.integers(0, 14).map(lambda quarters: quarters / 4)


@st.composite
def ceilings(draw: st.DrawFn) -> list[Ceiling]:
    """One RunGuard's keyword ceilings: any metrics, in any order, repeats allowed."""
    members = []
    for index in range(draw(st.integers(1, 5))):
        metric = draw(st.sampled_from(METRICS))
        limit = draw(dollar_limits) if metric == "cost_usd" else draw(count_limits)
        members.append(Ceiling(f"ceiling_{index}", metric, limit))
    return members


@st.composite
def accounts(draw: st.DrawFn) -> Any:
    """The totals a ceiling reads: settled usage and what calls in flight reserved."""
    return SimpleNamespace(
        calls=draw(counts),
        input_tokens=draw(counts),
        output_tokens=draw(counts),
        cost_usd=draw(dollars),
        reserved_calls=draw(counts),
        reserved_input_tokens=draw(counts),
        reserved_output_tokens=draw(counts),
        reserved_cost_usd=draw(dollars),
    )


@st.composite
def requests(draw: st.DrawFn) -> CallRequest:
    return CallRequest(
        provider="openai",
        endpoint="chat.completions",
        model="gpt-4o-mini",
        input_tokens=draw(counts),
        max_output_tokens=draw(counts),
        output_capped=True,
        stream=False,
        max_cost_usd=draw(st.none() | dollars),
    )


def first_trip(verdicts: list[Any]) -> Any:
    return next((trip for trip in verdicts if trip is not None), None)


@settings(max_examples=500)
@given(ceilings(), accounts(), requests())
def test_the_fused_admit_refuses_exactly_when_a_member_would(
    members: list[Ceiling], account: Any, request: CallRequest
) -> None:
    expected = first_trip([m.admit(request, account) for m in members])
    assert Ceilings(members).admit(request, account) == expected


@settings(max_examples=500)
@given(ceilings(), accounts(), requests())
def test_the_fused_settle_latches_exactly_when_a_member_would(
    members: list[Ceiling], account: Any, request: CallRequest
) -> None:
    result = CallResult(Usage())
    expected = first_trip([m.settled(request, result, account) for m in members])
    assert Ceilings(members).settled(request, result, account) == expected


class Other:
    """Any guard that is not a keyword ceiling."""


def test_checks_fuses_each_run_of_ceilings_and_keeps_the_order() -> None:
    calls, tokens, cost = (
        Ceiling("max_calls", "calls", 5),
        Ceiling("max_total_tokens", "total_tokens", 50),
        Ceiling("max_cost_usd", "cost_usd", 1.0),
    )
    first, second = Other(), Other()
    fused = checks([calls, tokens, first, cost, second, calls, cost])
    assert len(fused) == 5
    assert isinstance(fused[0], Ceilings) and fused[0].members == (calls, tokens)
    assert fused[1] is first
    assert fused[2] is cost  # a lone ceiling runs as itself
    assert fused[3] is second
    assert isinstance(fused[4], Ceilings) and fused[4].members == (calls, cost)
