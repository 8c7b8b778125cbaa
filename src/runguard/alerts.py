"""Warnings before a ceiling refuses: thresholds, and where alerts are delivered.

An alert is delivered to a callable, to a webhook (a JSON POST made by a
background thread, with a short timeout), or, by default, to the ``runguard``
logger as a warning. Delivery never raises into the agent and never makes it
wait for the network: a failing callable or webhook is reported as a warning.
"""

from __future__ import annotations

import functools
import json
import logging
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeAlias

from ._background import Background

log = logging.getLogger("runguard")

#: seconds a webhook POST may take before it is abandoned
WEBHOOK_TIMEOUT = 2.0


@dataclass(frozen=True)
class Alert:
    """A threshold crossed: which guard or budget, which amount, how far along."""

    #: "guard" (a RunGuard's ceiling) or "budget" (a shared Budget)
    source: str
    #: the ceiling's keyword (``max_cost_usd``) or the budget's name
    name: str
    #: what is measured: calls, input_tokens, output_tokens, total_tokens or cost_usd
    metric: str
    #: the fraction of the limit that was reached (1.0 for an "alert" budget's limit)
    threshold: float
    value: float
    limit: float
    #: the RunGuard whose call crossed the threshold
    run: str | None = None
    #: for budgets: the window, as ISO 8601 UTC times
    window_start: str | None = None
    window_end: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"budget {self.name!r}" if self.source == "budget" else f"{self.name}"
        window = f" (window {self.window_start} - {self.window_end})" if self.window_start else ""
        return (
            f"runguard alert: {where} reached {self.threshold:.0%} of its limit: "
            f"{self.metric} {self.value:,.6g} of {self.limit:,.6g}{window}"
        )


OnAlert: TypeAlias = Callable[[Alert], object] | str | None


def check_thresholds(value: object, field: str = "alert_at") -> tuple[float, ...]:
    """``alert_at`` as a sorted tuple of fractions in (0, 1]; raises naming ``field``."""
    if value is None:
        return ()
    items: Sequence[object]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        items = (value,)
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise TypeError(f"{field} must be a fraction or a list of fractions, got {value!r}")
    fractions = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise TypeError(f"{field} must hold numbers, got {item!r}")
        if not 0 < item <= 1:
            raise ValueError(f"{field} fractions must be in (0, 1], got {item!r}")
        fractions.append(float(item))
    return tuple(sorted(set(fractions)))


def check_on_alert(value: object, field: str = "on_alert") -> OnAlert:
    if value is None or callable(value):
        return value
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return value
    raise TypeError(f"{field} must be a callable or an http(s) webhook URL, got {value!r}")


def drain_webhooks(timeout: float = WEBHOOK_TIMEOUT + 1) -> bool:
    """Wait for queued webhook alerts (at exit, or in tests); True if all were handled."""
    return _webhooks.drain(timeout)


def deliver(alert: Alert, on_alert: OnAlert) -> None:
    """Hand an alert to its destination; never raises."""
    if on_alert is None:
        log.warning("%s", alert)
    elif isinstance(on_alert, str):
        _webhooks.submit(functools.partial(_post, on_alert, alert))
    else:
        try:
            on_alert(alert)
        except Exception as exc:  # the agent must not fail because a handler did
            warnings.warn(
                f"runguard: on_alert raised {exc!r}; the alert was: {alert}",
                RuntimeWarning,
                stacklevel=2,
            )


def _post(url: str, alert: Alert) -> None:
    body = json.dumps(alert.to_dict()).encode()
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=WEBHOOK_TIMEOUT) as answer:
            answer.read()
    except Exception as exc:
        warnings.warn(
            f"runguard: the alert webhook {url} failed ({exc!r}); the alert was: {alert}",
            RuntimeWarning,
            stacklevel=1,
        )


_webhooks = Background("runguard-webhooks", exit_wait=WEBHOOK_TIMEOUT + 1)
