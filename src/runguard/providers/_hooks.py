"""Hooks that take the hooked method's own parameters.

A hook of the generic shape, ``hooked(self, *args, **kwargs)`` calling
``original(self, *args, **kwargs)``, packs and unpacks every call's
arguments: about 4,000 CPU instructions per call on CPython 3.11, against
about 700 for a function with the original's own parameter list that passes
them on by name. Three hooks run on every LLM call, guarded or not, so the
hooks here are compiled when the SDK is patched, from the signature the
installed SDK has (``dataclasses`` builds its ``__init__`` the same way).

The hook's logic stays in plain functions, a :class:`Split`: what runs
before the original, after it returns, and if it raises. The compiled
function only passes them the arguments they read, by name.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import linecache
import types
from collections.abc import Callable
from typing import Any, NamedTuple


class Split(NamedTuple):
    """A hook in parts.

    ``before(self, *reads)`` runs first, given the arguments named by the
    hook's reads; it returns a state for the other parts, or None to let the
    original run alone. ``after(state, result)`` returns what the hook
    returns (it may be a coroutine function in a hook on a coroutine);
    ``failed(state, failure)`` sees what the original raised, and may raise
    something else instead. With ``rebind``, the original gets the state's
    attribute of that name for the parameter of that name. A split with only
    ``before`` runs it first and leaves the call alone.
    """

    before: Callable[..., Any]
    after: Callable[[Any, Any], Any] | None = None
    failed: Callable[[Any, BaseException], None] | None = None
    rebind: str | None = None


_serials = itertools.count()


def hooked(cls: type, name: str, split: Split, reads: tuple[str, ...]) -> Callable[..., Any]:
    """A function to put in place of ``cls.name`` that runs ``split`` around the original.

    ``reads`` are the parameters of the original that ``before`` takes, in
    order; the caller checks that the original has them. The original stays
    reachable as ``__wrapped__``, the split as ``runguard_hook``.
    """
    original = inspect.getattr_static(cls, name)  # may be inherited, or another's wrapper
    signature = inspect.signature(original)
    own, forward, namespace = _parameter_list(signature)
    this = next(iter(signature.parameters))
    if type(original) is types.FunctionType:
        callee = f"_rg_original({', '.join([this, *forward])})"
    else:  # another library's wrapper: called bound, as Python would call it
        callee = f"_rg_original.__get__({this})({', '.join(forward)})"
    coroutine = inspect.iscoroutinefunction(original)
    run = f"await {callee}" if coroutine else callee
    before = f"_rg_before({', '.join([this, *reads])})"
    if split.after is None and split.failed is None and split.rebind is None:
        body = [before, f"return {run}"]
    else:
        body = ["_rg_state = " + before, "if _rg_state is None:", f"    return {run}"]
        if split.rebind is not None:
            body.append(f"{split.rebind} = _rg_state.{split.rebind}")
        if split.failed is None:
            body.append(f"_rg_result = {run}")
        else:
            body += [
                "try:",
                f"    _rg_result = {run}",
                "except BaseException as _rg_failure:",
                "    _rg_failed(_rg_state, _rg_failure)",
                "    raise",
            ]
        if split.after is None:
            body.append("return _rg_result")
        else:
            finish = "_rg_after(_rg_state, _rg_result)"
            body.append(
                f"return await {finish}"
                if inspect.iscoroutinefunction(split.after)
                else f"return {finish}"
            )
    source = "\n    ".join([f"{'async ' if coroutine else ''}def {name}({own}):", *body]) + "\n"
    namespace.update(
        _rg_original=original,
        _rg_before=split.before,
        _rg_after=split.after,
        _rg_failed=split.failed,
    )
    filename = f"<runguard hook {cls.__qualname__}.{name} #{next(_serials)}>"
    # registered, so that tracebacks through the hook show its lines
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), namespace)  # our own template, filled from a signature
    function: Any = functools.update_wrapper(namespace[name], original)
    function.runguard_hook = split
    return function  # type: ignore[no-any-return]


def _parameter_list(signature: inspect.Signature) -> tuple[str, list[str], dict[str, Any]]:
    """The original's parameter list as source, how to pass each on, and its defaults by name.

    Defaults are bound in the namespace the function is compiled in, so any
    object serves (an SDK sentinel such as ``NOT_GIVEN``).
    """
    own: list[str] = []
    forward: list[str] = []
    namespace: dict[str, Any] = {}
    listed = list(signature.parameters.values())
    starred = False
    for index, parameter in enumerate(listed):
        name, kind = parameter.name, parameter.kind
        if name.startswith("_rg_"):
            raise ValueError(f"parameter {name!r} would shadow the hook's own names")
        if kind is parameter.VAR_POSITIONAL:
            text = passed = f"*{name}"
            starred = True
        elif kind is parameter.VAR_KEYWORD:
            text = passed = f"**{name}"
        elif kind is parameter.KEYWORD_ONLY:
            if not starred:
                own.append("*")
                starred = True
            text, passed = name, f"{name}={name}"
        else:
            text = passed = name
        if parameter.default is not parameter.empty:
            namespace[f"_rg_default_{index}"] = parameter.default
            text += f"=_rg_default_{index}"
        own.append(text)
        if kind is parameter.POSITIONAL_ONLY and (
            index + 1 == len(listed) or listed[index + 1].kind is not kind
        ):
            own.append("/")
        if index:  # the first, self, is passed on by the caller
            forward.append(passed)
    return ", ".join(own), forward, namespace
