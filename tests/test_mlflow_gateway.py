"""A real MLflow AI Gateway refuses an agent's call on a spent budget: one refusal, no retries.

One ``mlflow server`` subprocess (sqlite backend, on a free loopback port)
hosts the AI Gateway. Its endpoint routes to an OpenAI-compatible fake LLM on
127.0.0.1 (:class:`runguard.testing.FakeJudge`), and a GLOBAL budget policy
with ``budget_action`` REJECT allows less than one call's cost. Everything is
set up over the server's REST API (``/api/3.0/mlflow/gateway/...``), as a team
would; the agent is a real ``openai.OpenAI`` client pointed at the gateway's
OpenAI-compatible route, with the SDK's own retries on.

Why the second call is refused: the server runs one worker, whose in-memory
budget tracker loads the policy when it is created (the create handler
invalidates and refreshes it) and adds each call's cost (priced from the
upstream's usage) when the call completes. So the first call goes through and
spends the budget, and the next one is answered 429 "Budget limit exceeded
... Request rejected." before anything is sent upstream, with no wait for
``MLFLOW_GATEWAY_BUDGET_REFRESH_INTERVAL``.

Ground truth: the requests that reached the upstream (``FakeJudge.count``),
the requests the gateway itself logged (uvicorn's access log, written before
each response is sent), and the budget window the gateway reports over REST.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from runguard import RateLimitStorm, RunGuard, UpstreamBudgetExceeded
from runguard.testing import FakeJudge

#: the model the gateway's endpoint asks the upstream for (one MLflow can price)
MODEL = "gpt-4o-mini"
ENDPOINT = "agent-chat"
#: USD: less than one call's cost (120 input + 15 output tokens of gpt-4o-mini, ~$0.000027)
BUDGET_USD = 0.00001
#: calls the agent makes; every one after the refusal must be refused in-process
TURNS = 4
#: seconds `mlflow server` gets to answer /health
START_SECONDS = 60.0
CHAT_PATH = "/gateway/mlflow/v1/chat/completions"
#: one line of uvicorn's access log: ... "POST /gateway/mlflow/v1/chat/completions HTTP/1.1" 429
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/\S*) HTTP/[0-9.]+" (?P<status>\d{3})')


# -- the server ----------------------------------------------------------------------------


@dataclass
class Server:
    """A running ``mlflow server`` with its AI Gateway, and its log."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size

    def requests_since(self, mark: int) -> list[str]:
        """The requests the server logged after ``mark`` (a ``log_size()``)."""
        with self.log.open("rb") as log:
            log.seek(mark)
            text = log.read().decode("utf-8", "replace")
        return [
            f"{m['method']} {m['path'].split('?')[0]} {m['status']}" for m in ACCESS.finditer(text)
        ]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One REST call to the server; its JSON answer (a failed call fails the test)."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            pytest.fail(f"{method} {path} -> {error.code}: {error.read()!r}", pytrace=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and its workers (its own process group, started for it)."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("mlflow-gateway")
    port = free_port()
    log, artifacts = workdir / "server.log", workdir / "artifacts"
    # the tracking URI and experiment earlier tests left in the environment are not the server's
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes: not needed
    # the gateway accepts only public https upstreams unless told otherwise
    env["MLFLOW_GATEWAY_API_BASE_ALLOWED_SCHEMES"] = "http,https"
    env["MLFLOW_GATEWAY_API_BASE_ALLOW_PRIVATE_IPS"] = "true"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                # the gateway writes its traces in-process: a plain directory, not the proxy
                "--no-serve-artifacts",
                "--default-artifact-root", artifacts.as_uri(),
                "--workers", "1",  # one worker, so one budget tracker sees every call
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # its own process group, so its workers stop with it
        )  # fmt: skip
    started = Server(f"http://127.0.0.1:{port}", log, process)
    deadline = time.monotonic() + START_SECONDS
    while not answers(started.url):
        if process.poll() is not None or time.monotonic() > deadline:
            code = process.poll()
            stop(process)
            pytest.fail(
                f"mlflow server did not answer {started.url}/health within {START_SECONDS:.0f} s "
                f"(exit code {code}); its log:\n{started.log_text()}",
                pytrace=False,
            )
        time.sleep(0.2)
    try:
        yield started
    finally:
        stop(process)


def create_endpoint(server: Server, upstream_url: str) -> str:
    """A gateway endpoint that routes to ``upstream_url``: secret, model, endpoint. Its id."""
    secret = server.call(
        "POST",
        "/api/3.0/mlflow/gateway/secrets/create",
        {
            "secret_name": "fake-upstream-key",
            "secret_value": {"api_key": "sk-fake"},
            "provider": "openai",
            "auth_config": {"api_base": upstream_url},
        },
    )["secret"]
    model = server.call(
        "POST",
        "/api/3.0/mlflow/gateway/model-definitions/create",
        {
            "name": "fake-upstream-model",
            "secret_id": secret["secret_id"],
            "provider": "openai",
            "model_name": MODEL,
        },
    )["model_definition"]
    endpoint = server.call(
        "POST",
        "/api/3.0/mlflow/gateway/endpoints/create",
        {
            "name": ENDPOINT,
            "model_configs": [
                {
                    "model_definition_id": model["model_definition_id"],
                    "linkage_type": "PRIMARY",
                    "weight": 1.0,
                }
            ],
        },
    )["endpoint"]
    return str(endpoint["endpoint_id"])


def create_budget(server: Server, amount: float) -> str:
    """A GLOBAL budget policy that rejects calls once ``amount`` USD a day is spent. Its id."""
    policy = server.call(
        "POST",
        "/api/3.0/mlflow/gateway/budgets/create",
        {
            "budget_unit": "USD",
            "budget_amount": amount,
            "duration": {"unit": "DAYS", "value": 1},
            "target_scope": "GLOBAL",
            "budget_action": "REJECT",
        },
    )["budget_policy"]
    return str(policy["budget_policy_id"])


def ask(client: Any) -> None:
    client.chat.completions.create(
        model=ENDPOINT, messages=[{"role": "user", "content": "hi"}], max_tokens=16
    )


# -- the test ------------------------------------------------------------------------------


def test_a_gateway_budget_refusal_trips_at_once_and_nothing_more_is_sent(
    server: Server,
) -> None:
    if server.process.poll() is not None:
        pytest.fail(f"the mlflow server has exited; its log:\n{server.log_text()}", pytrace=False)
    with FakeJudge() as upstream:
        create_endpoint(server, upstream.url)
        policy_id = create_budget(server, BUDGET_USD)
        client = openai.OpenAI(
            base_url=f"{server.url}/gateway/mlflow/v1", api_key="x", max_retries=2
        )
        mark = server.log_size()
        outcomes: list[str] = []
        # the 429 keyword is what lets RunGuard read 429 answers; a storm needs 10 in a row,
        # so only the budget refusal itself can trip it here
        with RunGuard(max_consecutive_429s=10, raise_on_exit=False) as guard:
            for _ in range(TURNS):  # an agent that carries on after an error
                try:
                    ask(client)
                    outcomes.append("answered")
                except UpstreamBudgetExceeded:
                    outcomes.append("refused")
        sent = server.requests_since(mark)
        reached_upstream = upstream.count

    # the gateway let the first call through and refused the second, once: the SDK's two
    # retries of that 429 and the agent's later calls never left the process
    assert sent == [f"POST {CHAT_PATH} 200", f"POST {CHAT_PATH} 429"], server.log_text()
    assert reached_upstream == 1
    assert outcomes == ["answered"] + ["refused"] * (TURNS - 1)

    trip = guard.trip
    assert trip is not None
    assert trip.exception is UpstreamBudgetExceeded
    assert not issubclass(trip.exception, RateLimitStorm)
    assert trip.guard == "upstream_budget"
    assert trip.details["status"] == 429
    message = trip.details["message"]
    assert message.startswith("Budget limit exceeded."), message
    assert message.endswith("Request rejected."), message
    assert message in trip.reason, trip.reason

    # the one answer the agent got is the upstream's, and the one 429 was counted
    usage = guard.usage
    assert (usage.input_tokens, usage.output_tokens) == (120, 15)
    assert usage.rate_limited_attempts == 1

    # the refusal was the gateway's budget: its window holds the first call's spend, over the limit
    windows = server.call("GET", "/api/3.0/mlflow/gateway/budgets/windows")
    window = next(w for w in windows.get("windows", []) if w.get("budget_policy_id") == policy_id)
    assert float(window["current_spend"]) >= BUDGET_USD, windows
