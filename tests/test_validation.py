"""Settings are validated when a RunGuard (or a @guarded function) is made, naming the field."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest

from runguard import Price, RunGuard, guarded
from runguard.guards import Ceiling

CEILING_INT_FIELDS = ["max_calls", "max_input_tokens", "max_output_tokens", "max_total_tokens"]
# the failure-mode guards' counts, and the loop guards' window
GUARD_INT_FIELDS = [
    "max_input_tokens_per_call",
    "max_consecutive_429s",
    "max_total_429s",
    "max_repeated_tool_calls",
    "max_identical_requests",
]
INT_FIELDS = [*CEILING_INT_FIELDS, *GUARD_INT_FIELDS, "loop_window"]
NUMBER_FIELDS = ["max_cost_usd", "max_llm_seconds", "max_wall_seconds"]
ALL_FIELDS = [*INT_FIELDS, *NUMBER_FIELDS]

# (value, error) that every ceiling refuses
COMMON_BAD = [
    pytest.param(-1, ValueError, id="negative"),
    pytest.param(-(10**6), ValueError, id="very-negative"),
    pytest.param(0, ValueError, id="zero"),
    pytest.param("10", TypeError, id="str"),
    pytest.param(b"10", TypeError, id="bytes"),
    pytest.param(True, TypeError, id="true"),
    pytest.param(False, TypeError, id="false"),
    pytest.param([10], TypeError, id="list"),
    pytest.param(Decimal("10"), TypeError, id="decimal"),
    pytest.param(object(), TypeError, id="object"),
]
# floats are wrong in kind for a whole-unit ceiling, whatever their value
INT_ONLY_BAD = [
    pytest.param(10.0, TypeError, id="float"),
    pytest.param(0.5, TypeError, id="fraction"),
    pytest.param(math.nan, TypeError, id="nan"),
    pytest.param(math.inf, TypeError, id="inf"),
    pytest.param(-math.inf, TypeError, id="-inf"),
]
COST_ONLY_BAD = [
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param(math.inf, ValueError, id="inf"),
    pytest.param(-math.inf, ValueError, id="-inf"),
    pytest.param(-0.01, ValueError, id="negative-float"),
    pytest.param(0.0, ValueError, id="zero-float"),
    pytest.param(-0.0, ValueError, id="negative-zero"),
]

CEILING_CASES = [
    *[pytest.param(f, *p.values, id=f"{f}-{p.id}") for f in ALL_FIELDS for p in COMMON_BAD],
    *[pytest.param(f, *p.values, id=f"{f}-{p.id}") for f in INT_FIELDS for p in INT_ONLY_BAD],
    *[pytest.param(f, *p.values, id=f"{f}-{p.id}") for f in NUMBER_FIELDS for p in COST_ONLY_BAD],
]

OTHER_CASES = [
    pytest.param("scope", "thread", ValueError, id="scope-unknown"),
    pytest.param("scope", "", ValueError, id="scope-empty"),
    pytest.param("scope", "Process", ValueError, id="scope-case"),
    pytest.param("scope", None, (ValueError, TypeError), id="scope-none"),
    pytest.param("scope", 1, (ValueError, TypeError), id="scope-int"),
    pytest.param("scope", ["context"], (ValueError, TypeError), id="scope-list"),
    pytest.param("name", 1, TypeError, id="name-int"),
    pytest.param("name", b"run", TypeError, id="name-bytes"),
    pytest.param("name", ["run"], TypeError, id="name-list"),
    pytest.param("raise_on_exit", 1, TypeError, id="raise_on_exit-int"),
    pytest.param("raise_on_exit", 0, TypeError, id="raise_on_exit-zero"),
    pytest.param("raise_on_exit", "yes", TypeError, id="raise_on_exit-str"),
    pytest.param("raise_on_exit", None, TypeError, id="raise_on_exit-none"),
    pytest.param("guards", None, TypeError, id="guards-none"),
    pytest.param("guards", 5, TypeError, id="guards-int"),
    pytest.param("guards", "max_calls", TypeError, id="guards-str"),
    pytest.param("guards", b"max_calls", TypeError, id="guards-bytes"),
    pytest.param("guards", [object()], TypeError, id="guards-object"),
    pytest.param("guards", [None], TypeError, id="guards-none-item"),
    pytest.param("guards", ["max_calls"], TypeError, id="guards-str-item"),
    pytest.param("prices", ["gpt-4o"], TypeError, id="prices-list"),
    pytest.param("prices", "gpt-4o", TypeError, id="prices-str"),
    pytest.param("prices", 5, TypeError, id="prices-int"),
    pytest.param("prices", {1: Price(1, 2)}, TypeError, id="prices-int-key"),
    pytest.param("prices", {"": Price(1, 2)}, TypeError, id="prices-empty-key"),
    pytest.param("prices", {"m": 3}, TypeError, id="prices-int-value"),
    pytest.param("prices", {"m": None}, TypeError, id="prices-none-value"),
    pytest.param("prices", {"m": (1, 2)}, TypeError, id="prices-tuple-value"),
    pytest.param("prices", {"m": {"input": 1}}, TypeError, id="prices-mapping-missing"),
    pytest.param("prices", {"m": {"input": 1, "output": 2, "x": 3}}, TypeError, id="prices-extra"),
    pytest.param("prices", {"m": {"input": "1", "output": 2}}, TypeError, id="prices-str-field"),
    pytest.param("prices", {"m": {"input": -1, "output": 2}}, ValueError, id="prices-negative"),
    pytest.param("prices", {"m": {"input": 1, "output": math.nan}}, ValueError, id="prices-nan"),
    pytest.param("prices", {"m": ""}, (ValueError, TypeError), id="prices-empty-alias"),
]


def _message_names(exc: BaseException, field: str) -> None:
    assert field in str(exc), f"{type(exc).__name__}({exc}) does not name {field!r}"


@pytest.mark.parametrize(("field", "value", "error"), CEILING_CASES)
def test_ceilings_reject_bad_values_naming_the_field(field, value, error) -> None:
    with pytest.raises(error) as info:
        RunGuard(**{field: value})
    _message_names(info.value, field)


@pytest.mark.parametrize(("field", "value", "error"), CEILING_CASES)
def test_guarded_rejects_bad_ceilings_at_decoration_time(field, value, error) -> None:
    with pytest.raises(error) as info:
        guarded(**{field: value})
    _message_names(info.value, field)


@pytest.mark.parametrize(("field", "value", "error"), OTHER_CASES)
def test_other_settings_reject_bad_values_naming_the_field(field, value, error) -> None:
    with pytest.raises(error) as info:
        RunGuard(**{field: value})
    _message_names(info.value, field)


@pytest.mark.parametrize(("field", "value", "error"), OTHER_CASES)
def test_guarded_rejects_bad_settings_at_decoration_time(field, value, error) -> None:
    with pytest.raises(error) as info:
        guarded(**{field: value})
    _message_names(info.value, field)


def test_guarded_never_runs_the_function_when_settings_are_bad() -> None:
    ran = []
    with pytest.raises(ValueError, match="max_calls"):

        @guarded(max_calls=-5)
        def agent() -> None:
            ran.append(True)

    assert ran == []


def test_guarded_rejects_unknown_settings_at_decoration_time() -> None:
    with pytest.raises(TypeError, match="max_call"):
        guarded(max_call=3)


@pytest.mark.parametrize("field", [f for f in ALL_FIELDS if f != "loop_window"])
def test_a_huge_int_limit_is_accepted_or_refused_by_name(field: str) -> None:
    value = 10**400  # larger than any float
    try:
        guard = RunGuard(**{field: value})
    except (ValueError, TypeError) as exc:
        _message_names(exc, field)
    else:
        assert guard.guards[0].limit == value


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[(f, v) for f in CEILING_INT_FIELDS for v in (1, 7, 10**9)],
        ("max_cost_usd", 1),
        ("max_cost_usd", 0.01),
        ("max_cost_usd", 1e-9),
        ("max_cost_usd", 1e6),
    ],
)
def test_valid_ceilings_are_kept(field: str, value: float) -> None:
    guard = RunGuard(**{field: value})
    assert len(guard.guards) == 1
    ceiling = guard.guards[0]
    assert isinstance(ceiling, Ceiling)
    assert ceiling.name == field
    assert ceiling.limit == value
    assert ceiling.needs_price == (field == "max_cost_usd")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[(f, v) for f in GUARD_INT_FIELDS for v in (1, 7, 20)],
        *[(f, v) for f in ("max_llm_seconds", "max_wall_seconds") for v in (1, 0.25, 3600)],
    ],
)
def test_each_guard_keyword_builds_one_guard_named_after_it(field: str, value: float) -> None:
    guard = RunGuard(**{field: value})
    assert len(guard.guards) == 1
    built = guard.guards[0]
    assert built.limit == value
    assert built.name == field
    assert built.needs_price is False


@pytest.mark.parametrize("field", ["max_repeated_tool_calls", "max_identical_requests"])
def test_a_loop_window_shorter_than_the_loop_limit_is_refused(field: str) -> None:
    with pytest.raises(ValueError) as info:
        RunGuard(**{field: 5, "loop_window": 4})
    _message_names(info.value, "loop_window")
    _message_names(info.value, field)
    assert RunGuard(**{field: 5, "loop_window": 5}).guards[0].window == 5
    assert RunGuard(**{field: 5}).guards[0].window == 20  # the documented default


def test_none_means_no_ceiling() -> None:
    guard = RunGuard(
        max_calls=None,
        max_input_tokens=None,
        max_output_tokens=None,
        max_total_tokens=None,
        max_cost_usd=None,
        prices=None,
        name=None,
    )
    assert guard.guards == ()
    assert guard.scope == "context"
    assert guard.raise_on_exit is True


def test_settings_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        RunGuard(5)  # type: ignore[misc]


@pytest.mark.parametrize("scope", ["context", "process"])
def test_valid_scopes(scope: str) -> None:
    assert RunGuard(scope=scope).scope == scope  # type: ignore[arg-type]


def test_valid_prices_forms() -> None:
    guard = RunGuard(
        max_cost_usd=1.0,
        prices={
            "a": Price(input=1, output=2),
            "b": {"input": 0, "output": 0.5, "cache_read": 0.1},
            "c": "gpt-4o",
        },
    )
    assert guard.guards[0].needs_price


# -- Price ---------------------------------------------------------------------------------

PRICE_FIELDS = ["input", "output", "cache_read", "cache_write"]
PRICE_BAD = [
    pytest.param(-1, ValueError, id="negative"),
    pytest.param(-1e-12, ValueError, id="tiny-negative"),
    pytest.param(math.nan, ValueError, id="nan"),
    pytest.param(math.inf, ValueError, id="inf"),
    pytest.param(-math.inf, ValueError, id="-inf"),
    pytest.param("1", TypeError, id="str"),
    pytest.param(True, TypeError, id="bool"),
    pytest.param(Decimal("1"), TypeError, id="decimal"),
    pytest.param([1], TypeError, id="list"),
]


@pytest.mark.parametrize("field", PRICE_FIELDS)
@pytest.mark.parametrize(("value", "error"), PRICE_BAD)
def test_price_rejects_bad_fields_naming_them(field: str, value, error) -> None:
    values: dict[str, object] = {"input": 1.0, "output": 2.0, field: value}
    with pytest.raises(error) as info:
        Price(**values)  # type: ignore[arg-type]
    _message_names(info.value, f"Price.{field}")


@pytest.mark.parametrize("field", ["input", "output"])
def test_price_input_and_output_are_required_numbers(field: str) -> None:
    values: dict[str, object] = {"input": 1.0, "output": 2.0, field: None}
    with pytest.raises(TypeError) as info:
        Price(**values)  # type: ignore[arg-type]
    _message_names(info.value, f"Price.{field}")
    with pytest.raises(TypeError):
        Price(output=1.0) if field == "input" else Price(input=1.0)  # type: ignore[call-arg]


def test_price_accepts_zero_ints_and_missing_cache_prices() -> None:
    price = Price(input=0, output=3)
    assert price.cache_read is None and price.cache_write is None
    assert Price(input=0.5, output=1.5, cache_read=0, cache_write=2).cache_write == 2
