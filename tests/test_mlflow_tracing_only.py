"""RunGuard in a real ``mlflow-tracing`` install: traces marked, one warning, nothing raised.

``mlflow-tracing`` is MLflow's tracing SDK without the tracking client (no
``mlflow.MlflowClient``, no runs). docs/mlflow.md promises that in such an
install RunGuard still marks a trip on the trace, warns once that it cannot
log to runs, and never raises into the agent. The other MLflow tests fake this
by deleting ``mlflow.MlflowClient``; this one builds a fresh virtualenv with
the real distribution (same version as the dev install's ``mlflow``), puts
this checkout's ``src`` on its path, and runs an agent there.

What a tracing-only install needs to record a trace at all: in 3.17,
``mlflow.start_span`` yields a no-op span unless a tracking URI and a trace
destination are set (resolving the default URI imports the file store, whose
dependencies the distribution does not ship; the default experiment needs the
tracking client). So the probe sets both, the URI pointing at a stub tracking
server (stdlib ``http.server``, in the probe's process) that records what
mlflow-tracing exports: the trace info (with its tags) and the spans (with
their attributes and events). That export is the ground truth read back here,
along with the finished span object, the fake provider's wire and the warnings
actually emitted.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

#: this checkout's sources: the test file's repo, wherever it was cloned
SRC = Path(__file__).resolve().parent.parent / "src"
RUN_ID = "0123456789abcdef0123456789abcdef"


def _tracing_requirement() -> str:
    try:
        return f"mlflow-tracing=={importlib.metadata.version('mlflow')}"
    except importlib.metadata.PackageNotFoundError:
        return "mlflow-tracing"


PROBE = textwrap.dedent(
    """
    import importlib.metadata
    import json
    import sys
    import threading
    import traceback
    import warnings
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    RUN_ID = sys.argv[1]
    HEAVY = ("mlflow", "openai", "anthropic", "wrapt", "genai_prices", "requests")
    report = {}


    def heavy(names):
        return sorted({n.split(".")[0] for n in names if n.split(".")[0] in HEAVY})


    # -- the install ------------------------------------------------------------------------
    def installed(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None


    report["dists"] = {d: installed(d) for d in ("mlflow-tracing", "mlflow-skinny", "mlflow")}

    # -- import runguard: nothing heavy -------------------------------------------------------
    before = set(sys.modules)
    import runguard
    from runguard.integrations.mlflow import drain
    from runguard.testing import FakeProvider, Reply

    report["runguard_file"] = runguard.__file__
    report["import_runguard_loaded"] = heavy(set(sys.modules) - before)


    # -- a stub tracking server: what mlflow-tracing exports ----------------------------------
    exported = {"traces": [], "spans": {}, "other": []}


    class Stub(BaseHTTPRequestHandler):
        def _serve(self):
            size = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(size) if size else b""
            out = b"{}"
            if self.command == "POST" and self.path == "/api/3.0/mlflow/traces":
                info = json.loads(body)["trace"]["trace_info"]
                exported["traces"].append(info)
                # where the client uploads the spans: back to this server
                location = f"{BASE}/artifacts/{info['trace_id']}"
                tags = {**info.get("tags", {}), "mlflow.artifactLocation": location}
                info = {**info, "tags": tags}
                out = json.dumps({"trace": {"trace_info": info}}).encode()
            elif self.command == "PUT" and self.path.startswith("/artifacts/"):
                exported["spans"][self.path.split("/")[2]] = json.loads(body)["spans"]
            else:
                exported["other"].append(f"{self.command} {self.path}")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        def log_message(self, *args):
            pass


    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    BASE = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()

    import mlflow
    import openai
    from mlflow.entities.trace_location import MlflowExperimentLocation

    report["has_MlflowClient"] = hasattr(mlflow, "MlflowClient")
    report["has_update_current_trace"] = hasattr(mlflow, "update_current_trace")
    mlflow.set_tracking_uri(BASE)
    mlflow.tracing.set_destination(MlflowExperimentLocation(experiment_id="0"))


    def ask(client):
        return client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )


    def ours(caught):
        return [
            f"{w.category.__name__}: {w.message}" for w in caught if "runguard" in str(w.message)
        ]


    def others(caught):
        return [
            f"{w.category.__name__}: {w.message}"
            for w in caught
            if "runguard" not in str(w.message)
        ]


    # -- a trip inside a span, the run id given: trace marked, one warning --------------------
    fake = FakeProvider(default=Reply())
    client = fake.openai(max_retries=0)
    trip = report["trip"] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            before = set(sys.modules)
            guard = runguard.RunGuard(
                max_calls=1, raise_on_exit=False, mlflow_run=RUN_ID, name="agent"
            )
            with guard:
                trip["guard_entry_loaded"] = sorted(
                    n for n in set(sys.modules) - before if not n.startswith("runguard")
                )
                with mlflow.start_span("agent") as span:
                    trip["span_type"] = type(span).__name__
                    trip["first"] = ask(client).choices[0].message.content
                    trip["wire_after_first"] = fake.wire_count
                    try:
                        ask(client)
                        trip["second"] = "sent"
                    except runguard.BudgetExceeded as exc:
                        trip["second"] = type(exc).__name__
                        trip["second_guard"] = exc.trip.guard
                trace_id = span.trace_id
            trip["escaped"] = None
        except BaseException:
            trip["escaped"] = traceback.format_exc()
            trace_id = None
        trip["wire_count"] = fake.wire_count
        trip["tripped"] = guard.tripped
        trip["drained"] = drain(10)
        mlflow.flush_trace_async_logging()
    trip["runguard_warnings"] = ours(caught)
    trip["other_warnings"] = others(caught)
    trip["trace_id"] = trace_id
    # the finished span, as mlflow-tracing holds it
    trip["span_attributes"] = {
        k: v for k, v in span.attributes.items() if k.startswith("runguard.")
    }
    trip["span_events"] = [{"name": e.name, "attributes": e.attributes} for e in span.events]
    # what mlflow-tracing exported
    trip["exported_tags"] = [
        info.get("tags", {}) for info in exported["traces"] if info["trace_id"] == trace_id
    ]
    exported_spans = exported["spans"].get(trace_id, [])



    trip["exported_spans"] = [
        {
            "name": s["name"],
            "attributes": {
                k: json.loads(v) for k, v in s["attributes"].items() if k.startswith("runguard.")
            },
            "events": [
                {
                    "name": e["name"],
                    "attributes": e.get("attributes", {}),
                }
                for e in s.get("events", [])
            ],
        }
        for s in exported_spans
    ]


    # -- artifact options enter and exit cleanly ----------------------------------------------
    def clean(name, log_tool_output=False, **options):
        result = report[name] = {}
        fake = FakeProvider(default=Reply())
        client = fake.openai(max_retries=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with runguard.RunGuard(max_calls=5, **options) as guard:
                    ask(client)
                    if log_tool_output:
                        guard.log_tool_output(1, "search", {"hits": 3})
                result["escaped"] = None
            except BaseException:
                result["escaped"] = traceback.format_exc()
            result["drained"] = drain(10)
        result["calls"] = guard.usage.calls
        result["wire_count"] = fake.wire_count
        result["held"] = len(guard.artifacts)
        result["run"] = guard.mlflow_run
        result["runguard_warnings"] = ours(caught)
        result["other_warnings"] = others(caught)


    clean("max_artifact_writes", max_artifact_writes=3)
    clean("consolidate_artifacts", consolidate_artifacts=True)
    clean("consolidate_with_output", log_tool_output=True, consolidate_artifacts=True)
    clean("mlflow_run_start", mlflow_run="start")

    report["exported_other"] = exported["other"]
    print("RESULT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def tracing_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv with ``mlflow-tracing`` (not ``mlflow``), openai and RunGuard's deps."""
    venv = tmp_path_factory.mktemp("mlflow-tracing") / "venv"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    requirements = [_tracing_requirement(), "openai", "wrapt", "typing-extensions", "genai-prices"]
    done = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            *requirements,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"pip install {requirements} failed:\n{done.stderr}"
    print(f"\nmlflow-tracing venv ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    yield python


@pytest.fixture(scope="module")
def probe(tracing_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the agent in the tracing-only venv; its report, parsed."""
    script = tmp_path_factory.mktemp("probe") / "probe.py"
    script.write_text(PROBE)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "MLFLOW_", "OPENAI_", "VIRTUAL_ENV"))
    }
    env["PYTHONPATH"] = str(SRC)
    done = subprocess.run(
        [str(tracing_python), str(script), RUN_ID],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=script.parent,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no report; stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    report: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return report


def test_the_install_is_tracing_only_and_tests_this_checkout(probe: dict[str, Any]) -> None:
    assert probe["dists"]["mlflow-tracing"] is not None
    assert probe["dists"]["mlflow"] is None
    assert probe["dists"]["mlflow-skinny"] is None
    assert probe["has_MlflowClient"] is False
    assert probe["has_update_current_trace"] is True
    assert Path(probe["runguard_file"]).resolve().is_relative_to(SRC.resolve())


def test_import_runguard_and_guard_entry_load_nothing_unexpected(probe: dict[str, Any]) -> None:
    assert probe["import_runguard_loaded"] == []
    # mlflow and openai were imported by the agent already; entering the guard loads
    # RunGuard's hooks (wrapt) and nothing of MLflow's or of another SDK
    loaded = probe["trip"]["guard_entry_loaded"]
    assert not [m for m in loaded if m.split(".")[0] in ("mlflow", "anthropic", "requests")]


def test_a_trip_is_refused_before_the_wire_and_nothing_escapes(probe: dict[str, Any]) -> None:
    trip = probe["trip"]
    assert trip["escaped"] is None
    assert trip["span_type"] == "LiveSpan"  # a real span, not mlflow's no-op one
    assert trip["first"] == "ok"
    assert trip["wire_after_first"] == 1
    assert trip["second"] == "BudgetExceeded"
    assert trip["second_guard"] == "max_calls"
    assert trip["wire_count"] == 1  # the refused call never reached the provider
    assert trip["tripped"] is True
    assert trip["drained"] is True


def test_no_tracking_client_is_exactly_one_warning(probe: dict[str, Any]) -> None:
    warned = probe["trip"]["runguard_warnings"]
    assert len(warned) == 1, warned
    assert warned[0].startswith("RuntimeWarning: ")
    assert "tracking client" in warned[0]


EXPECTED_ATTRIBUTES = {
    "runguard.trip_guard": "max_calls",
    "runguard.trip_limit": 1.0,
    "runguard.trip_observed": 2.0,
    "runguard.run": "agent",  # the RunGuard's name
}


def _trip_attributes(attributes: dict[str, Any]) -> None:
    reason = attributes.pop("runguard.trip_reason")
    assert isinstance(reason, str) and reason
    assert attributes == EXPECTED_ATTRIBUTES


def test_the_finished_span_carries_the_trip(probe: dict[str, Any]) -> None:
    trip = probe["trip"]
    _trip_attributes(dict(trip["span_attributes"]))
    assert [e["name"] for e in trip["span_events"]] == ["runguard.trip"]
    _trip_attributes(dict(trip["span_events"][0]["attributes"]))


def test_the_exported_trace_is_tagged_and_its_span_marked(probe: dict[str, Any]) -> None:
    trip = probe["trip"]
    assert len(trip["exported_tags"]) == 1, "the trace was exported once"
    tags = trip["exported_tags"][0]
    assert tags["runguard.tripped"] == "true"
    assert tags["runguard.trip_guard"] == "max_calls"
    [agent] = [s for s in trip["exported_spans"] if s["name"] == "agent"]
    _trip_attributes(dict(agent["attributes"]))
    assert [e["name"] for e in agent["events"]] == ["runguard.trip"]
    _trip_attributes(dict(agent["events"][0]["attributes"]))


@pytest.mark.parametrize("case", ["max_artifact_writes", "consolidate_artifacts"])
def test_artifact_options_enter_and_exit_cleanly(probe: dict[str, Any], case: str) -> None:
    result = probe[case]
    assert result["escaped"] is None
    assert result["drained"] is True
    assert (result["calls"], result["wire_count"]) == (1, 1)
    assert result["run"] is None  # no active run (there cannot be one) and none given
    assert result["runguard_warnings"] == []


def test_held_output_without_a_run_is_one_warning(probe: dict[str, Any]) -> None:
    result = probe["consolidate_with_output"]
    assert result["escaped"] is None
    assert result["held"] == 1  # still on the RunGuard
    [warned] = result["runguard_warnings"]
    assert "1 held artifacts have no MLflow run to go to" in warned


def test_mlflow_run_start_warns_and_does_not_raise(probe: dict[str, Any]) -> None:
    result = probe["mlflow_run_start"]
    assert result["escaped"] is None
    assert (result["calls"], result["wire_count"]) == (1, 1)
    assert result["run"] is None  # no run could be started
    # the "no tracking client" warning was already given once in this process
    [warned] = result["runguard_warnings"]
    assert "could not start an MLflow run" in warned
    assert "MlflowClient" in warned
