"""What a RunGuard leaves on an MLflow run at exit, against a real MLflow (local sqlite store).

Ground truth: the usage the fake provider sent back (the scripted Reply) and the
requests that reached its wire; what MLflow holds is read back with MLflow's own
client. Store writes are counted by wrapping MlflowClient's methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient

import runguard
import runguard.integrations.mlflow as mlflow_integration
from runguard import GuardTripped, RunGuard, step
from runguard.integrations.mlflow import drain
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o-mini"
REPLY = Reply(input_tokens=120, output_tokens=15)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh sqlite tracking store, used from a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("runguard-tests")  # in this store, whatever was active before
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


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


def run_data(run_id: str) -> tuple[dict[str, float], dict[str, str]]:
    assert drain(10), "MLflow writes still pending"
    data = MlflowClient().get_run(run_id).data
    return data.metrics, data.tags


def ledger_of(run_id: str, path: str) -> dict[str, Any]:
    assert drain(10), "MLflow writes still pending"
    loaded: dict[str, Any] = mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    return loaded


# -- what is logged ----------------------------------------------------------------------


def test_exit_logs_usage_and_trip_to_the_run_active_when_entered(
    tracking: str, fake: FakeProvider, client: Any
) -> None:
    with mlflow.start_run() as run, RunGuard(max_calls=3, raise_on_exit=False, name="agent"):
        for _ in range(5):
            with contextlib.suppress(GuardTripped):
                ask(client)
    metrics, tags = run_data(run.info.run_id)
    sent = fake.wire_count
    assert sent == 3
    assert metrics["runguard.agent.calls"] == sent
    assert metrics["runguard.agent.input_tokens"] == sent * REPLY.input_tokens
    assert metrics["runguard.agent.output_tokens"] == sent * REPLY.output_tokens
    assert metrics["runguard.agent.cost_usd"] > 0
    assert tags["runguard.agent.tripped"] == "true"
    assert tags["runguard.agent.trip_guard"] == "max_calls"
    assert "over the limit of 3" in tags["runguard.agent.trip_reason"]


def test_an_untripped_guard_logs_tripped_false(tracking: str, client: Any) -> None:
    with mlflow.start_run() as run, RunGuard():
        ask(client)
    metrics, tags = run_data(run.info.run_id)
    assert tags["runguard.tripped"] == "false"
    assert "runguard.trip_guard" not in tags
    assert metrics["runguard.calls"] == 1


def test_the_ledger_is_one_json_artifact_by_step(tracking: str, client: Any) -> None:
    with mlflow.start_run() as run, RunGuard(name="bot") as guard:
        with step("plan", role="planner"):
            ask(client)
        with step("write"):
            ask(client)
            ask(client)
    logged = ledger_of(run.info.run_id, "runguard/bot/ledger.json")
    assert logged == json.loads(json.dumps(guard.ledger.to_dict()))
    assert logged["by_step"]["write"]["calls"] == 2
    assert logged["by_step"]["plan"]["input_tokens"] == REPLY.input_tokens


def test_a_named_inner_guard_does_not_collide_with_its_outer_guard(
    tracking: str, client: Any
) -> None:
    with mlflow.start_run() as run, RunGuard():
        ask(client)
        with RunGuard(name="tool"):
            ask(client)
    metrics, _ = run_data(run.info.run_id)
    assert metrics["runguard.calls"] == 2  # the outer guard saw both calls
    assert metrics["runguard.tool.calls"] == 1


def test_two_unnamed_guards_on_one_run_keep_both_ledgers(tracking: str, client: Any) -> None:
    with mlflow.start_run() as run:
        with RunGuard():
            ask(client)
        with RunGuard():
            ask(client)
            ask(client)
    first = ledger_of(run.info.run_id, "runguard/ledger.json")
    second = ledger_of(run.info.run_id, "runguard/ledger.2.json")
    calls = [sum(m["calls"] for m in logged["by_model"].values()) for logged in (first, second)]
    assert calls == [1, 2]


def test_the_files_guards_claimed_are_remembered_for_the_most_recent_runs_only(
    tracking: str, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server starting a run per request must not keep an entry per request forever;
    # a run still being written to keeps numbering its guards' files.
    monkeypatch.setattr(mlflow_integration, "CLAIMS_KEPT", 2)
    monkeypatch.setattr(mlflow_integration, "_claimed", OrderedDict())
    runs = {}
    for label in "ABC":
        with mlflow.start_run() as run:
            runs[label] = run.info.run_id
    for calls, label in enumerate("ABACA", start=1):
        with RunGuard(mlflow_run=runs[label]):
            for _ in range(calls):
                ask(client)
        assert drain(10), "MLflow writes still pending"
        assert len(mlflow_integration._claimed) <= 2

    def calls_in(label: str, path: str) -> int:
        logged = ledger_of(runs[label], path)
        return sum(m["calls"] for m in logged["by_model"].values())

    # A's three guards: C came between the second and third, and pushed B out, not A
    assert [
        calls_in("A", f"runguard/{name}")
        for name in ("ledger.json", "ledger.2.json", "ledger.3.json")
    ] == [1, 3, 5]
    assert calls_in("B", "runguard/ledger.json") == 2
    assert calls_in("C", "runguard/ledger.json") == 4


def test_a_started_run_is_ended_even_when_its_exit_write_fails(
    tracking: str, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("store refused the batch")

    with pytest.warns(RuntimeWarning, match="store refused the batch"):
        with RunGuard(mlflow_run="start") as guard:
            run_id = guard.mlflow_run
            assert run_id is not None
            monkeypatch.setattr(MlflowClient, "log_batch", refuse)
            ask(client)
        assert drain(10)
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_writes_per_guard_do_not_grow_with_the_calls(
    tracking: str, client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    for method in ("log_batch", "log_dict", "log_metric", "set_tag", "log_artifact"):
        original = getattr(MlflowClient, method)

        def counted(
            self: Any, *args: Any, _name: str = method, _f: Any = original, **kw: Any
        ) -> Any:
            writes.append(_name)
            return _f(self, *args, **kw)

        monkeypatch.setattr(MlflowClient, method, counted)

    def writes_for(calls: int) -> list[str]:
        writes.clear()
        with mlflow.start_run(), RunGuard():
            for _ in range(calls):
                ask(client)
        assert drain(10)
        return sorted(writes)

    one, many = writes_for(1), writes_for(60)
    assert one == many  # the same writes, however many calls
    assert one.count("log_batch") == one.count("log_dict") == 1  # log_dict goes via log_artifact


# -- which run -----------------------------------------------------------------------------


def test_no_active_run_means_nothing_is_logged_and_no_run_is_started(
    tracking: str, client: Any
) -> None:
    with RunGuard():
        ask(client)
    assert drain(10)
    assert mlflow.active_run() is None
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_mlflow_false_logs_nothing(tracking: str, client: Any) -> None:
    with mlflow.start_run() as run, RunGuard(mlflow=False):
        ask(client)
    metrics, tags = run_data(run.info.run_id)
    assert not [k for k in [*metrics, *tags] if k.startswith("runguard.")]


def test_an_explicit_run_id_is_used_even_after_that_run_ended(tracking: str, client: Any) -> None:
    with mlflow.start_run() as finished:
        pass
    with RunGuard(mlflow_run=finished.info.run_id):
        ask(client)
    metrics, _ = run_data(finished.info.run_id)
    assert metrics["runguard.calls"] == 1


def test_the_run_is_captured_at_entry_so_worker_threads_are_logged(
    tracking: str, fake: FakeProvider, client: Any
) -> None:
    with mlflow.start_run() as run, RunGuard():
        work = runguard.propagate(ask)
        threads = [threading.Thread(target=work, args=(client,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    metrics, _ = run_data(run.info.run_id)
    assert metrics["runguard.calls"] == fake.wire_count == 4


def test_bad_mlflow_settings_are_refused_naming_the_field() -> None:
    with pytest.raises(TypeError, match="mlflow"):
        RunGuard(mlflow="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mlflow_run"):
        RunGuard(mlflow_run="")
    with pytest.raises(TypeError, match="mlflow_run"):
        RunGuard(mlflow_run=42)  # type: ignore[arg-type]


# -- failures never reach the agent ------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_is_one_warning_and_never_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: Any
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{closed_port()}")
    try:
        with pytest.warns(RuntimeWarning, match="could not log to MLflow") as caught:
            with RunGuard(mlflow_run="0123456789abcdef"):
                ask(client)
            assert drain(30)
    finally:
        mlflow.set_tracking_uri(None)
    assert len([w for w in caught if "MLflow" in str(w.message)]) == 1


def test_a_hung_server_does_not_hold_the_guard_exit(
    monkeypatch: pytest.MonkeyPatch, client: Any
) -> None:
    # A server that accepts connections and never answers: the exit must return
    # while the write is still waiting on it.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = threading.Event()
    held: list[socket.socket] = []

    def hang() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            accepted.set()

    threading.Thread(target=hang, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    mlflow.set_tracking_uri(f"http://127.0.0.1:{listener.getsockname()[1]}")
    try:
        with pytest.warns(RuntimeWarning, match="could not log to MLflow"):
            with RunGuard(mlflow_run="0123456789abcdef"):
                ask(client)
            assert accepted.wait(10), "the write never reached the server"
            assert not drain(0), "the guard's exit waited for the hung server"
            assert drain(30)  # it gives up after MLFLOW_HTTP_REQUEST_TIMEOUT, with a warning
    finally:
        mlflow.set_tracking_uri(None)
        listener.close()
        for conn in held:
            conn.close()


def test_mlflow_is_never_imported_when_the_user_did_not_import_it() -> None:
    code = textwrap.dedent(
        """
        import sys
        from runguard import RunGuard
        from runguard.testing import FakeProvider
        client = FakeProvider().openai()
        with RunGuard(max_calls=5):
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
        print("mlflow" in sys.modules)
        """
    )
    src = str(ROOT / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- traces ------------------------------------------------------------------------------------


def test_a_trip_inside_a_trace_marks_the_span_and_tags_the_trace(
    tracking: str, client: Any
) -> None:
    mlflow.set_experiment("traces")
    with RunGuard(max_calls=1, raise_on_exit=False) as guard, mlflow.start_span("agent") as span:
        ask(client)
        with pytest.raises(GuardTripped):
            ask(client)
        trace_id = span.trace_id
    mlflow.flush_trace_async_logging()
    found = mlflow.search_traces(
        filter_string="tags.`runguard.tripped` = 'true'", return_type="list"
    )
    assert [t.info.trace_id for t in found] == [trace_id]
    trace = mlflow.get_trace(trace_id)
    assert trace.info.tags["runguard.trip_guard"] == "max_calls"
    root = next(s for s in trace.data.spans if s.name == "agent")
    assert root.attributes["runguard.trip_guard"] == "max_calls"
    assert [e.name for e in root.events] == ["runguard.trip"]
    assert guard.tripped


def test_traces_without_a_trip_are_not_tagged(tracking: str, client: Any) -> None:
    mlflow.set_experiment("quiet")
    with RunGuard(max_calls=5), mlflow.start_span("agent"):
        ask(client)
    mlflow.flush_trace_async_logging()
    assert mlflow.search_traces(return_type="list")
    assert not mlflow.search_traces(
        filter_string="tags.`runguard.tripped` = 'true'", return_type="list"
    )
