"""What a RunGuard leaves on a real ``mlflow server``, read back over HTTP as a team would.

One ``mlflow server`` subprocess (sqlite backend, proxied artifact store, on a
free loopback port) serves the module; each test works in its own experiment.

Ground truth: the requests that reached the fake provider's wire (the scripted
Reply's usage, times the calls sent); what the server holds, read back over
HTTP with MLflow's own client (runs, metrics, tags, artifacts, traces) and the
files its artifact proxy stored on disk; and, for the number of writes, the
requests the server itself logged (uvicorn's access log, written before each
response is sent, so it is complete once ``drain()`` has returned).

A server that is stopped or never answers is covered in test_mlflow_logging.py
(one warning, the guard's exit never waits), so it is not repeated here.
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
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

from runguard import BudgetExceeded, RunGuard
from runguard.integrations.mlflow import drain
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o-mini"
REPLY = Reply(input_tokens=120, output_tokens=15)
#: seconds `mlflow server` gets to answer /health (it usually takes 15-30 s)
START_SECONDS = 60.0
#: one line of uvicorn's access log: ... "POST /api/2.0/mlflow/runs/log-batch HTTP/1.1" 200 OK
ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>/\S*) HTTP/[0-9.]+" (?P<status>\d{3})')
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")


# -- the server ----------------------------------------------------------------------------


@dataclass
class Server:
    """A running ``mlflow server`` and where it keeps its log and artifacts."""

    url: str
    log: Path
    artifacts: Path
    process: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_size(self) -> int:
        return self.log.stat().st_size

    def requests_since(self, mark: int) -> list[str]:
        """The requests the server logged after ``mark`` (a ``log_size()``), run ids elided."""
        with self.log.open("rb") as log:
            log.seek(mark)
            text = log.read().decode("utf-8", "replace")
        return [
            f"{m['method']} {RUN_ID.sub('<run>', m['path'].split('?')[0])} {m['status']}"
            for m in ACCESS.finditer(text)
        ]


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
    workdir = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log, artifacts = workdir / "server.log", workdir / "artifacts"
    # the tracking URI and experiment earlier tests left in the environment are not the server's
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner processes: not needed
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
                "--artifacts-destination", str(artifacts),
                "--workers", "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # its own process group, so its workers stop with it
        )  # fmt: skip
    started = Server(f"http://127.0.0.1:{port}", log, artifacts, process)
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


@pytest.fixture
def experiment(
    server: Server, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The server as tracking URI, and a fresh experiment on it for this test (its id)."""
    if server.process.poll() is not None:
        pytest.fail(f"the mlflow server has exited; its log:\n{server.log_text()}", pytrace=False)
    # set_tracking_uri/set_experiment also write these; restored after the test
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr("mlflow.tracking.fluent._active_experiment_id", None)
    mlflow.set_tracking_uri(server.url)
    experiment_id: str = mlflow.set_experiment(f"runguard-{request.node.name}").experiment_id
    try:
        yield experiment_id
    finally:
        drain(30)  # nothing of this test's is still on its way to the server
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=REPLY)


@pytest.fixture
def client(fake: FakeProvider) -> Any:
    return fake.openai(max_retries=0)


def ask(client: Any) -> None:
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16
    )


def agent(client: Any, turns: int) -> None:
    """An agent loop that catches nothing: a refusal ends it."""
    for _ in range(turns):
        ask(client)


# -- the guard's exit write ----------------------------------------------------------------


def test_a_tripped_guard_in_a_run_leaves_trip_usage_and_ledger_on_the_server(
    experiment: str, server: Server, fake: FakeProvider, client: Any
) -> None:
    with (
        mlflow.start_run() as run,
        pytest.raises(BudgetExceeded, match="over the limit of 2"),
        RunGuard(max_calls=2) as guard,
    ):
        agent(client, 5)
    run_id = run.info.run_id
    assert drain(30), "MLflow writes still pending"

    sent = fake.count("/chat/completions")
    assert sent == fake.wire_count == 2  # the third call was refused before the wire
    data = MlflowClient().get_run(run_id).data
    assert data.tags["runguard.tripped"] == "true"
    assert data.tags["runguard.trip_guard"] == "max_calls"
    assert "over the limit of 2" in data.tags["runguard.trip_reason"]
    assert data.metrics["runguard.calls"] == sent
    assert data.metrics["runguard.input_tokens"] == sent * REPLY.input_tokens
    assert data.metrics["runguard.output_tokens"] == sent * REPLY.output_tokens
    assert data.metrics["runguard.cost_usd"] > 0

    ledger = mlflow.artifacts.load_dict(f"runs:/{run_id}/runguard/ledger.json")
    assert ledger == json.loads(json.dumps(guard.ledger.to_dict()))
    assert ledger["by_model"][MODEL]["calls"] == sent
    # uploaded through the server's artifact proxy, into its --artifacts-destination
    stored = [p for p in server.artifacts.rglob("ledger.json") if run_id in p.parts]
    assert len(stored) == 1
    assert json.loads(stored[0].read_text()) == ledger


def test_mlflow_run_start_creates_a_finished_run_named_after_the_guard(
    experiment: str, fake: FakeProvider, client: Any
) -> None:
    with RunGuard(mlflow_run="start", name="nightly") as guard:
        agent(client, 3)
        assert mlflow.active_run() is None  # created with the client, not the fluent API
    assert mlflow.active_run() is None
    run_id = guard.mlflow_run
    assert run_id is not None, "the run was not created"
    assert drain(30), "MLflow writes still pending"

    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "nightly"
    assert run.info.experiment_id == experiment
    assert run.info.status == "FINISHED"
    assert run.info.end_time is not None
    assert run.data.tags["runguard.started"] == "true"
    assert run.data.tags["runguard.nightly.tripped"] == "false"
    assert run.data.metrics["runguard.nightly.calls"] == fake.wire_count == 3
    ledger = mlflow.artifacts.load_dict(f"runs:/{run_id}/runguard/nightly/ledger.json")
    assert ledger["by_model"][MODEL]["calls"] == 3
    # that run and no other
    assert [r.info.run_id for r in MlflowClient().search_runs([experiment])] == [run_id]


def test_a_tripped_guard_ends_the_run_it_started_as_failed(
    experiment: str, fake: FakeProvider, client: Any
) -> None:
    with (
        pytest.raises(BudgetExceeded),
        RunGuard(mlflow_run="start", name="runaway", max_calls=2) as guard,
    ):
        agent(client, 5)
    assert mlflow.active_run() is None
    run_id = guard.mlflow_run
    assert run_id is not None, "the run was not created"
    assert drain(30), "MLflow writes still pending"

    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "runaway"
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    assert run.data.tags["runguard.runaway.tripped"] == "true"
    assert run.data.tags["runguard.runaway.trip_guard"] == "max_calls"
    assert run.data.metrics["runguard.runaway.calls"] == fake.wire_count == 2


@pytest.mark.parametrize("target", ["existing run", "start"])
def test_the_server_gets_the_same_requests_for_one_call_as_for_200(
    experiment: str, server: Server, fake: FakeProvider, client: Any, target: str
) -> None:
    def requests_for(calls: int) -> list[str]:
        run = "start" if target == "start" else MlflowClient().create_run(experiment).info.run_id
        mark = server.log_size()
        with RunGuard(mlflow_run=run):
            agent(client, calls)
        assert drain(30), "MLflow writes still pending"
        return sorted(server.requests_since(mark))

    one, many = requests_for(1), requests_for(200)
    assert fake.wire_count == 201
    assert one == many  # the same requests, however many calls
    assert one.count("POST /api/2.0/mlflow/runs/log-batch 200") == 1  # tags and metrics
    uploads = [r for r in one if r.startswith("PUT /api/2.0/mlflow-artifacts/artifacts/")]
    assert len(uploads) == 1 and uploads[0].endswith("/runguard/ledger.json 200")
    if target == "start":
        assert one.count("POST /api/2.0/mlflow/runs/create 200") == 1
        assert one.count("POST /api/2.0/mlflow/runs/update 200") == 1  # ended
    assert all(r.endswith(" 200") for r in one), one


# -- traces --------------------------------------------------------------------------------


def test_a_trip_inside_a_span_makes_the_trace_findable_on_the_server(
    experiment: str, fake: FakeProvider, client: Any
) -> None:
    with RunGuard(max_calls=5), mlflow.start_span("quiet"):
        ask(client)
    with (
        pytest.raises(BudgetExceeded),
        RunGuard(max_calls=1, name="loop"),
        mlflow.start_span("agent") as span,
    ):
        trace_id = span.trace_id
        agent(client, 5)
    assert fake.wire_count == 2
    mlflow.flush_trace_async_logging()  # traces are exported in the background

    assert len(mlflow.search_traces(return_type="list")) == 2
    found = mlflow.search_traces(
        filter_string="tags.`runguard.tripped` = 'true'", return_type="list"
    )
    assert [t.info.trace_id for t in found] == [trace_id]
    trace = mlflow.get_trace(trace_id)
    assert trace is not None
    assert trace.info.tags["runguard.trip_guard"] == "max_calls"
    root = next(s for s in trace.data.spans if s.name == "agent")
    assert "runguard.trip" in [e.name for e in root.events]
    assert root.attributes["runguard.trip_guard"] == "max_calls"
    assert root.attributes["runguard.run"] == "loop"
