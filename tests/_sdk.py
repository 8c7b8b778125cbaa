"""Feature detection for tests of an SDK surface that older SDK versions lack.

The suite runs against every supported version of the openai and anthropic
SDKs. A test of a surface the installed SDK does not have (``client.responses``
on an old openai, ``messages.count_tokens`` on an old anthropic, a parameter
like ``max_completion_tokens``) is skipped by looking for that surface, never
by comparing version numbers: the SDK itself says what it ships. Only a
missing attribute or parameter skips; any other error on the way fails.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])

_MISSING = object()


def has(obj: Any, path: str) -> bool:
    """Whether ``obj`` has the dotted attribute ``path``, e.g. ``"chat.completions.stream"``."""
    return _walk(obj, path) is not _MISSING


def surface(obj: Any, path: str) -> Any:
    """``obj.<path>``, or skip the test: ``surface(client, "responses").create(...)``."""
    __tracebackhide__ = True  # the skip is reported at the test's line
    found = _walk(obj, path)
    if found is _MISSING:
        _skip(obj, f"has no {path}")
    return found


def accepts(method: F, name: str) -> F:
    """``method``, or skip the test if it takes no parameter called ``name``."""
    __tracebackhide__ = True
    if name not in inspect.signature(method).parameters:
        _skip(method, f"{method.__qualname__}() takes no {name}")
    return method


def _walk(obj: Any, path: str) -> Any:
    for name in path.split("."):
        try:
            # looked up without running it: an attribute that exists but fails
            # when read is a failure of the test, not a reason to skip it
            inspect.getattr_static(obj, name)
        except AttributeError:
            return _MISSING
        obj = getattr(obj, name)
    return obj


def _skip(obj: Any, what: str) -> NoReturn:
    __tracebackhide__ = True
    package = str(getattr(obj, "__module__", None) or type(obj).__module__).split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", "?")
    pytest.skip(f"{package} {version} {what}")


def chat_helper(client: Any) -> Any:
    """openai's chat ``stream()`` helper, from ``client.beta`` in releases before it left beta."""
    __tracebackhide__ = True
    if has(client, "chat.completions.stream"):
        return client.chat.completions.stream
    return surface(client, "beta.chat.completions.stream")
