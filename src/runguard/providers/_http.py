"""What one HTTP answer says, read for the guards: status, wait asked for, budget refusals."""

from __future__ import annotations

import json
import math
import re
from email.utils import parsedate_to_datetime
from time import time
from typing import Any

from .._records import Attempt

#: statuses whose body may say that a spending budget or quota is spent
REFUSAL_STATUSES = frozenset({400, 402, 403, 429})
_BUDGET_CODES = frozenset({"budget_exceeded", "insufficient_quota", "billing_hard_limit_reached"})
# MLflow AI Gateway ("Budget limit exceeded ... Request rejected."), LiteLLM
# ("Budget has been exceeded"), OpenAI ("You exceeded your current quota"),
# Anthropic ("Your credit balance is too low").
_BUDGET_WORDS = re.compile(
    r"budget (limit )?(has been )?(exceeded|exhausted)|exceeded your current quota"
    r"|credit balance is too low|insufficient (credits|quota|balance)",
    re.IGNORECASE,
)
_MESSAGE_LIMIT = 300


def attempt_of(status: int, headers: Any, body: bytes | None) -> Attempt:
    """The :class:`Attempt` for one answer; ``body`` only for :data:`REFUSAL_STATUSES`."""
    refusal = _budget_refusal(status, body) if body is not None or status == 402 else None
    return Attempt(status, retry_after(headers), refusal)


def retry_after(headers: Any) -> float | None:
    """Seconds the provider asked to wait, from ``retry-after-ms`` or ``retry-after``.

    A header that does not parse is passed over, as the SDKs pass it over.
    """
    if headers is None:
        return None
    for name, per_second in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            value = headers.get(name)
        except (TypeError, ValueError):
            return None
        seconds = None if value is None else _seconds(value, per_second)
        if seconds is not None:
            return seconds
    return None


def _seconds(value: Any, per_second: float) -> float | None:
    try:
        seconds = float(value) / per_second
    except (TypeError, ValueError):
        if per_second != 1.0:
            return None
        try:  # retry-after may be an HTTP date
            seconds = parsedate_to_datetime(value).timestamp() - time()
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _budget_refusal(status: int, body: bytes | None) -> str | None:
    text = body.decode("utf-8", "replace") if body else ""
    message, codes = _error_of(text)
    if status == 402 or codes & _BUDGET_CODES or _BUDGET_WORDS.search(message or text):
        shown = (message or text or "payment required").strip()
        return shown if len(shown) <= _MESSAGE_LIMIT else shown[: _MESSAGE_LIMIT - 3] + "..."
    return None


def _error_of(text: str) -> tuple[str | None, frozenset[str]]:
    """The message and the type/code strings of a JSON error body, if it is one."""
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return None, frozenset()
    if not isinstance(data, dict):
        return None, frozenset()
    error = data.get("error", data)
    if isinstance(error, str):
        return error, frozenset()
    if not isinstance(error, dict):
        return None, frozenset()
    codes = frozenset(v for v in (error.get("type"), error.get("code")) if isinstance(v, str))
    message = error.get("message", data.get("detail"))
    return (message if isinstance(message, str) else None), codes
