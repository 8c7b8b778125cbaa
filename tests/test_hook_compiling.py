"""The hooks compiled with the hooked method's own signature (``providers/_hooks.py``).

Each test hooks a small class of its own and checks what the original
received: the arguments must reach it exactly as the caller passed them,
whatever the shape of its parameter list.
"""

from __future__ import annotations

import asyncio
import inspect
import traceback
from typing import Any

import pytest
import wrapt

from runguard.providers._hooks import Split, hooked

NOT_GIVEN = object()  # an SDK-style sentinel default


class Record:
    """What the parts of a split saw, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def before(self, this: Any, *reads: Any) -> Any:
        self.seen.append(("before", *reads))
        return "state"

    def after(self, state: Any, result: Any) -> Any:
        self.seen.append(("after", state, result))
        return ("after", result)

    def failed(self, state: Any, failure: BaseException) -> None:
        self.seen.append(("failed", state, type(failure).__name__))


class Shapes:
    def method(
        self, a: Any, /, b: Any, c: Any = NOT_GIVEN, *args: Any, d: Any, e: Any = 5, **kw: Any
    ) -> Any:
        return (a, b, c, args, d, e, kw)

    def keyword_only(self, *, data: Any, response: Any = None) -> Any:
        return (data, response)

    def boom(self, x: Any) -> Any:
        raise KeyError(x)

    async def coroutine(self, options: Any, *, stream: bool = False) -> Any:
        return (options, stream)


def install(name: str, split: Split, reads: tuple[str, ...]) -> type:
    cls = type("Hooked", (Shapes,), {})
    setattr(cls, name, getattr(Shapes, name))
    setattr(cls, name, hooked(cls, name, split, reads))
    return cls


def test_every_kind_of_parameter_reaches_the_original_as_passed() -> None:
    record = Record()
    cls = install("method", Split(record.before, record.after), ("b", "e"))
    obj = cls()
    assert obj.method(1, 2, d=4) == ("after", (1, 2, NOT_GIVEN, (), 4, 5, {}))
    assert obj.method(1, b=2, d=4, e=6, z=7) == ("after", (1, 2, NOT_GIVEN, (), 4, 6, {"z": 7}))
    assert obj.method(1, 2, 3, 8, 9, d=4) == ("after", (1, 2, 3, (8, 9), 4, 5, {}))
    # before gets the parameters it reads, however they were passed
    assert [seen[1:] for seen in record.seen if seen[0] == "before"] == [(2, 5), (2, 6), (2, 5)]
    with pytest.raises(TypeError):
        obj.method(a=1, b=2, d=4)  # positional-only stays positional-only
    assert inspect.signature(cls.method) == inspect.signature(Shapes.method)
    assert cls.method.__wrapped__ is Shapes.method
    assert cls.method.runguard_hook.before == record.before


def test_a_before_only_split_runs_first_and_never_changes_the_result() -> None:
    record = Record()
    cls = install("keyword_only", Split(record.before), ("data", "response"))
    assert cls().keyword_only(data=1, response=2) == (1, 2)
    assert cls().keyword_only(data=3) == (3, None)
    assert record.seen == [("before", 1, 2), ("before", 3, None)]


def test_no_state_lets_the_original_run_alone() -> None:
    record = Record()
    cls = install("method", Split(lambda this, b: None, record.after, record.failed), ("b",))
    assert cls().method(1, 2, d=3) == (1, 2, NOT_GIVEN, (), 3, 5, {})
    assert record.seen == []


def test_rebind_sends_the_states_value_instead() -> None:
    class State:
        options = "prepared"

    cls = install("coroutine", Split(lambda this, options: State(), rebind="options"), ("options",))
    assert asyncio.run(cls().coroutine("given", stream=True)) == ("prepared", True)


def test_a_failure_reaches_failed_and_propagates_unless_replaced() -> None:
    record = Record()
    cls = install("boom", Split(record.before, record.after, record.failed), ("x",))
    with pytest.raises(KeyError) as info:
        cls().boom("key")
    assert info.value.args == ("key",)
    assert record.seen == [("before", "key"), ("failed", "state", "KeyError")]
    # the traceback shows the hook's own lines
    text = "".join(traceback.format_exception(info.value))
    assert "_rg_result = _rg_original(self, x)" in text

    def replace(state: Any, failure: BaseException) -> None:
        raise ValueError("replaced") from None

    cls = install("boom", Split(record.before, record.after, replace), ("x",))
    with pytest.raises(ValueError, match="replaced"):
        cls().boom("key")


def test_a_coroutine_is_awaited_and_an_async_after_too() -> None:
    record = Record()

    async def after(state: Any, result: Any) -> Any:
        await asyncio.sleep(0)
        return ("async after", state, result)

    cls = install("coroutine", Split(record.before, after), ("options",))
    assert inspect.iscoroutinefunction(cls.coroutine)
    assert asyncio.run(cls().coroutine(1)) == ("async after", "state", (1, False))
    cls = install("coroutine", Split(record.before, record.after), ("options",))
    assert asyncio.run(cls().coroutine(2, stream=True)) == ("after", (2, True))


def test_another_librarys_wrapper_still_sees_its_instance() -> None:
    instances = []

    def spy(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        instances.append(instance)
        return wrapped(*args, **kwargs)

    cls = type("Hooked", (Shapes,), {})
    cls.keyword_only = wrapt.FunctionWrapper(Shapes.keyword_only, spy)
    record = Record()
    cls.keyword_only = hooked(cls, "keyword_only", Split(record.before), ("data",))
    obj = cls()
    assert obj.keyword_only(data=1) == (1, None)
    assert instances == [obj]
    assert record.seen == [("before", 1)]


def test_a_parameter_that_would_shadow_the_hooks_names_is_refused() -> None:
    class Odd:
        def method(self, _rg_state: Any) -> Any:
            return _rg_state

    with pytest.raises(ValueError, match="_rg_state"):
        hooked(Odd, "method", Split(lambda this: None), ())
