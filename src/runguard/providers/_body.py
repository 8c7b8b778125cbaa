"""Reading request bodies: SDK sentinels (``NOT_GIVEN``, ``Omit``) count as absent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def body_of(options: Any) -> dict[str, Any] | None:
    """The JSON body a request will send, with ``extra_body`` merged in."""
    body = getattr(options, "json_data", None)
    if not isinstance(body, dict):
        return None
    extra = getattr(options, "extra_json", None)
    if isinstance(extra, dict) and extra:
        body = {**body, **extra}
    return body


def billable(options: Any, endpoints: Mapping[str, str]) -> tuple[str, dict[str, Any]] | None:
    """(endpoint, body) of a POST to one of ``endpoints`` (path -> endpoint), else None."""
    method = getattr(options, "method", None)
    if method != "post" and (not isinstance(method, str) or method.lower() != "post"):
        return None
    url = getattr(options, "url", None)
    endpoint = endpoints.get(url.partition("?")[0]) if isinstance(url, str) else None
    if endpoint is None:
        return None
    body = body_of(options)
    return None if body is None else (endpoint, body)


def int_field(body: dict[str, Any], *names: str) -> int | None:
    """The first of ``names`` that holds a real int (not a bool, not a sentinel)."""
    for name in names:
        value = body.get(name)
        if type(value) is int:
            return value
    return None


def str_field(body: dict[str, Any], name: str, default: str = "unknown") -> str:
    value = body.get(name)
    return value if type(value) is str else default


def fingerprint(trace: list[Any], endpoint: str, model: str, extra: Any = None) -> int:
    """A hash of a request: what its token count's walk noted, and a JSON-like ``extra``.

    Equal for equal content (in the same key order).
    """
    return hash((tuple(trace), endpoint, model, None if extra is None else _frozen(extra)))


def _frozen(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict or isinstance(value, Mapping):
        return tuple((key, _frozen(item)) for key, item in value.items())
    if kind is list or kind is tuple:
        return tuple(_frozen(item) for item in value)
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        return _frozen(dump())
    return repr(value)
