"""Alerts before a RunGuard's ceilings refuse: ``alert_at=`` and ``on_alert=``.

Ground truth is the usage the scripted :class:`Reply` sent back (dollars
priced by ``genai_prices.calc_price``), what reached the fake provider, and,
for webhooks, the JSON a real local HTTP server received. No test measures
time: that the agent never waits for a webhook is shown by the order of
events (the agent's calls return while the server still holds the request).
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import socket
import threading
from collections.abc import Iterator
from typing import Any

import genai_prices
import pytest

import runguard
import runguard.alerts
from runguard import Alert, BudgetExceeded, RunGuard
from runguard.alerts import drain_webhooks
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o"
REPLY = Reply(input_tokens=300, output_tokens=20)
#: every call asks for at most what the reply then uses, so the worst case never exceeds it
MAX_TOKENS = REPLY.output_tokens


# -- helpers ---------------------------------------------------------------------


def catalogue_price(model: str, provider: str = "openai", **tokens: int) -> float:
    """The price genai-prices itself gives for these tokens (the reference for cost_usd)."""
    usage = genai_prices.Usage(**tokens)
    return float(genai_prices.calc_price(usage, model, provider_id=provider).total_price)


#: what one call costs
CALL_COST = catalogue_price(
    MODEL, input_tokens=REPLY.input_tokens, output_tokens=REPLY.output_tokens
)


def ask(client: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS
    )


def alerts_after_each_call(client: Any, calls: int, alerts: list[Alert]) -> list[int]:
    """Make ``calls`` calls; how many alerts had arrived when each one returned."""
    seen = []
    for _ in range(calls):
        ask(client)
        seen.append(len(alerts))
    return seen


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=REPLY)


@pytest.fixture
def client(fake: FakeProvider) -> Any:
    return fake.openai(max_retries=0)


class Hook:
    """A local HTTP server recording the JSON POSTed to it; ``hold`` makes it hang."""

    def __init__(self, hold: bool = False) -> None:
        self.bodies: list[Any] = []
        self.paths: list[str] = []
        self.content_types: list[str | None] = []
        self.received = threading.Event()
        self.release = threading.Event()
        self.answered = threading.Event()
        #: for each held request: whether the test released it (False: gave up waiting)
        self.released: list[bool] = []
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(length)))
                hook.paths.append(self.path)
                hook.content_types.append(self.headers.get("Content-Type"))
                hook.received.set()
                if hold:
                    hook.released.append(hook.release.wait(timeout=30))
                self.send_response(204)
                self.end_headers()
                hook.answered.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    yield server
    server.close()


@pytest.fixture
def hung_hook() -> Iterator[Hook]:
    server = Hook(hold=True)
    yield server
    server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- thresholds on the keyword ceilings -----------------------------------------------------


def test_each_threshold_fires_once_with_the_values_reached(client: Any) -> None:
    # the 0.5 line is at 5.25 calls' worth of dollars, the 0.9 line at 9.45
    limit = 10.5 * CALL_COST
    alerts: list[Alert] = []
    with RunGuard(
        max_cost_usd=limit, alert_at=[0.9, 0.5], on_alert=alerts.append, name="agent"
    ) as guard:
        seen = alerts_after_each_call(client, 10, alerts)
    first, second = math.ceil(0.5 * 10.5), math.ceil(0.9 * 10.5)
    assert seen == [0] * (first - 1) + [1] * (second - first) + [2] * (11 - second)
    assert [a.threshold for a in alerts] == [0.5, 0.9]
    for alert, calls in zip(alerts, (first, second), strict=True):
        assert (alert.source, alert.name, alert.metric, alert.run) == (
            "guard",
            "max_cost_usd",
            "cost_usd",
            "agent",
        )
        assert alert.limit == limit
        assert alert.value == pytest.approx(calls * CALL_COST)
        assert (alert.window_start, alert.window_end) == (None, None)
    assert guard.usage.cost_usd == pytest.approx(10 * CALL_COST)
    assert not guard.tripped


def test_each_keyword_ceiling_has_its_own_thresholds(client: Any) -> None:
    alerts: list[Alert] = []
    with RunGuard(
        max_calls=4,
        max_input_tokens=8 * REPLY.input_tokens,
        max_output_tokens=4 * REPLY.output_tokens,
        max_total_tokens=100 * (REPLY.input_tokens + REPLY.output_tokens),
        alert_at=0.5,
        on_alert=alerts.append,
        raise_on_exit=False,
    ):
        ask(client)
        assert alerts == []
        ask(client)
        assert sorted((a.name, a.metric, a.value) for a in alerts) == [
            ("max_calls", "calls", 2),
            ("max_output_tokens", "output_tokens", 2 * REPLY.output_tokens),
        ]
        ask(client)
        ask(client)
        with pytest.raises(BudgetExceeded):
            ask(client)
    assert sorted((a.name, a.value) for a in alerts) == [
        ("max_calls", 2),
        ("max_input_tokens", 4 * REPLY.input_tokens),
        ("max_output_tokens", 2 * REPLY.output_tokens),
    ]  # max_total_tokens never reached half of its limit


def test_a_fresh_runguard_fires_again(client: Any) -> None:
    alerts: list[Alert] = []
    settings: dict[str, Any] = {"max_calls": 4, "alert_at": [0.5, 1.0], "on_alert": alerts.append}
    with RunGuard(name="first", **settings):
        assert alerts_after_each_call(client, 4, alerts) == [0, 1, 1, 2]
    with RunGuard(name="second", **settings):
        assert alerts_after_each_call(client, 4, alerts) == [2, 3, 3, 4]
    assert [(a.run, a.threshold) for a in alerts] == [
        ("first", 0.5),
        ("first", 1.0),
        ("second", 0.5),
        ("second", 1.0),
    ]


def test_nested_runguards_alert_on_their_own_ceilings(client: Any) -> None:
    outer_alerts: list[Alert] = []
    inner_alerts: list[Alert] = []
    with (
        RunGuard(max_calls=8, alert_at=0.5, on_alert=outer_alerts.append, name="outer"),
        RunGuard(max_calls=2, alert_at=0.5, on_alert=inner_alerts.append, name="inner"),
    ):
        ask(client)
        ask(client)
    assert [(a.run, a.value) for a in inner_alerts] == [("inner", 1)]
    assert outer_alerts == []


def test_without_on_alert_the_alert_is_a_logging_warning(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="runguard"),
        RunGuard(max_calls=4, alert_at=0.5, name="logged"),
    ):
        ask(client)
        assert caplog.records == []
        ask(client)
    (record,) = [r for r in caplog.records if r.name == "runguard"]
    assert record.levelno == logging.WARNING
    assert "max_calls" in record.getMessage()
    assert "50%" in record.getMessage()


def test_alert_text_says_what_was_reached() -> None:
    alert = Alert("guard", "max_cost_usd", "cost_usd", 0.8, 4.0, 5.0, run="agent")
    assert "max_cost_usd" in str(alert) and "80%" in str(alert)
    assert alert.to_dict()["run"] == "agent"
    assert json.loads(json.dumps(alert.to_dict())) == alert.to_dict()


def test_a_raising_on_alert_warns_and_the_call_still_returns(
    fake: FakeProvider, client: Any
) -> None:
    def broken(alert: Alert) -> None:
        raise RuntimeError("pager is down")

    with RunGuard(max_calls=2, alert_at=0.5, on_alert=broken) as guard:
        with pytest.warns(RuntimeWarning, match="pager is down"):
            answer = ask(client)
        ask(client)  # no second alert, no second warning
    assert answer.choices[0].message.content == REPLY.text
    assert fake.wire_count == 2
    assert guard.usage.calls == 2


def test_alerts_are_delivered_outside_the_ledger_lock(client: Any) -> None:
    seen: list[int] = []
    done = threading.Event()

    def on_alert(alert: Alert) -> None:
        seen.append(guard.usage.calls)  # takes the ledger's lock

    guard = RunGuard(max_calls=2, alert_at=0.5, on_alert=on_alert)

    def agent() -> None:
        with guard:
            ask(client)
        done.set()

    threading.Thread(target=agent, daemon=True).start()
    assert done.wait(timeout=10), "the alert was delivered while the ledger's lock was held"
    assert seen == [1]


# -- webhooks ------------------------------------------------------------------------------


def test_a_webhook_receives_the_alert_as_json(client: Any, hook: Hook) -> None:
    with RunGuard(max_calls=4, alert_at=[0.5, 0.75], on_alert=hook.url, name="agent"):
        for _ in range(3):
            ask(client)
    assert drain_webhooks(timeout=10)
    assert hook.paths == ["/hook", "/hook"]
    assert hook.content_types == ["application/json"] * 2
    assert hook.bodies == [
        Alert("guard", "max_calls", "calls", 0.5, 2, 4, run="agent").to_dict(),
        Alert("guard", "max_calls", "calls", 0.75, 3, 4, run="agent").to_dict(),
    ]


def test_a_webhook_that_cannot_be_reached_warns_and_the_agent_goes_on(
    fake: FakeProvider, client: Any
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/hook"
    with pytest.warns(RuntimeWarning, match="webhook"):
        with RunGuard(max_calls=4, alert_at=0.5, on_alert=url) as guard:
            for _ in range(4):
                ask(client)
        assert drain_webhooks(timeout=10)
    assert fake.wire_count == 4
    assert guard.usage.calls == 4


def test_a_hung_webhook_does_not_hold_up_the_agent(
    monkeypatch: pytest.MonkeyPatch, fake: FakeProvider, client: Any, hung_hook: Hook
) -> None:
    # A delivery made on the agent's path would wait for the server (up to this
    # timeout), while the server waits for the test to release it after the
    # agent's calls return: it would give up (released == [False]) first.
    monkeypatch.setattr(runguard.alerts, "WEBHOOK_TIMEOUT", 60.0)
    with RunGuard(max_calls=4, alert_at=0.25, on_alert=hung_hook.url) as guard:
        for _ in range(4):
            ask(client)
    assert fake.wire_count == 4
    assert guard.usage.calls == 4
    # the request reached the server and is still unanswered now that the calls are done
    assert hung_hook.received.wait(timeout=10)
    assert not hung_hook.answered.is_set()
    assert hung_hook.released == []
    hung_hook.release.set()
    assert drain_webhooks(timeout=10)
    assert hung_hook.released == [True]
    assert hung_hook.bodies[0]["name"] == "max_calls"


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alert_at", "error"),
    [
        (0, ValueError),
        (0.0, ValueError),
        (1.5, ValueError),
        (-0.1, ValueError),
        ([0.5, 2], ValueError),
        ("x", TypeError),
        (True, TypeError),
        ([0.5, None], TypeError),
        ({0.5}, TypeError),
    ],
)
def test_bad_alert_at_raises_naming_it(alert_at: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="alert_at"):
        RunGuard(max_calls=1, alert_at=alert_at)


@pytest.mark.parametrize("on_alert", [5, "ftp://x", "example.com/hook", b"http://x"])
def test_bad_on_alert_raises_naming_it(on_alert: Any) -> None:
    with pytest.raises(TypeError, match="on_alert"):
        RunGuard(max_calls=1, on_alert=on_alert)


def test_good_alert_settings_are_accepted() -> None:
    RunGuard(max_calls=1, alert_at=1, on_alert="https://example.invalid/hook")
    RunGuard(max_calls=1, alert_at=(0.25, 0.5), on_alert=print)
    runguard.guarded(max_calls=1, alert_at=0.5)


def test_alert_at_without_a_keyword_ceiling_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="alert_at"):
        RunGuard(alert_at=0.5)
    with pytest.raises(ValueError, match="alert_at"):
        RunGuard(alert_at=0.5, max_consecutive_429s=3)  # not a ceiling with an amount
    assert RunGuard(alert_at=0.5, max_calls=3).guards
