"""MLflow artifact writes inside a RunGuard: counted, refused over a ceiling, or consolidated.

Ground truth is what the MLflow run's artifact store holds, read back with
MLflow's own client (``list_artifacts``, ``mlflow.artifacts.load_text`` /
``load_dict``) from a real local sqlite tracking store: a refused write must
be absent from the run, an admitted one present, and a held one present only
inside the consolidated ``runguard/artifacts.json``. RunGuard's own counters
(``usage.artifact_writes``, the exit metrics) are checked against that
listing, never on their own. Uploads are counted by wrapping MLflow's
``TrackingServiceClient.log_artifact``; LLM calls by the requests that reached
the fake provider's wire.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service.client import TrackingServiceClient

import runguard
from runguard import (
    ArtifactBudgetExceeded,
    BudgetExceeded,
    GuardTripped,
    RunGuard,
    step,
)
from runguard.integrations import mlflow as rg_mlflow
from runguard.integrations.mlflow import drain
from runguard.integrations.mlflow_artifacts import SMALL_BYTES, watch
from runguard.testing import FakeProvider, Reply

MODEL = "gpt-4o-mini"


# -- fixtures and helpers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store, created once: each test gets a copy (creating one is slow)."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template_db: Path) -> Iterator[str]:
    """A fresh sqlite tracking store of the test's own, used from a scratch working directory."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_db, db)
    uri = f"sqlite:///{db}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("runguard-artifacts")  # its artifacts go under tmp_path
    # Install RunGuard's hooks now, so a test that wraps MLflow's methods wraps them.
    watch()
    yield uri
    assert drain(10), "MLflow writes still pending"
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # back to the default


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider(default=Reply())


@pytest.fixture
def llm(fake: FakeProvider) -> Any:
    return fake.openai(max_retries=0)


def ask(client: Any) -> None:
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=16
    )


def stored(run_id: str) -> dict[str, int]:
    """Every file on the run -> its size in bytes, read from the artifact store."""
    assert drain(10), "MLflow writes still pending"
    client = MlflowClient()
    found: dict[str, int] = {}
    folders: list[str | None] = [None]
    while folders:
        for info in client.list_artifacts(run_id, folders.pop()):
            if info.is_dir:
                folders.append(info.path)
            else:
                found[info.path] = int(info.file_size or 0)
    return found


def user_files(run_id: str) -> dict[str, int]:
    """The run's files other than RunGuard's own (``runguard/...``)."""
    return {p: size for p, size in stored(run_id).items() if not p.startswith("runguard/")}


def held(run_id: str, name: str | None = None) -> dict[str, Any]:
    """The consolidated artifact a guard wrote on the run."""
    assert drain(10), "MLflow writes still pending"
    path = f"runguard/{name}/artifacts.json" if name else "runguard/artifacts.json"
    loaded: dict[str, Any] = mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    return loaded


def metrics(run_id: str) -> dict[str, float]:
    assert drain(10), "MLflow writes still pending"
    found: dict[str, float] = MlflowClient().get_run(run_id).data.metrics
    return found


def experiment_id() -> str:
    experiment = mlflow.get_experiment_by_name("runguard-artifacts")
    assert experiment is not None
    return str(experiment.experiment_id)


def run_of(guard: RunGuard) -> str:
    run_id = guard.mlflow_run
    assert run_id is not None, "RunGuard has no MLflow run"
    return run_id


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch, tracking: str) -> list[str]:
    """The local paths MLflow's tracking client was asked to upload, in order.

    Wraps the method RunGuard itself hooks (installed by ``tracking``), so its
    counting stays in place underneath.
    """
    seen: list[str] = []
    original: Any = TrackingServiceClient.log_artifact

    def counted(self: Any, run_id: str, local_path: Any, artifact_path: Any = None) -> Any:
        seen.append(str(local_path))
        return original(self, run_id, local_path, artifact_path)

    monkeypatch.setattr(TrackingServiceClient, "log_artifact", counted)
    return seen


# -- the write ceiling ---------------------------------------------------------------------


def test_the_write_that_crosses_max_artifact_writes_is_refused_and_not_uploaded(
    tracking: str,
) -> None:
    refused: dict[int, ArtifactBudgetExceeded] = {}
    with (
        mlflow.start_run() as run,
        RunGuard(max_artifact_writes=3, name="agent", raise_on_exit=False) as guard,
    ):
        for i in range(10):
            try:
                mlflow.log_text(f"note {i}", f"notes/{i}.txt")
            except ArtifactBudgetExceeded as exc:
                refused[i] = exc
    run_id = run.info.run_id
    assert sorted(user_files(run_id)) == ["notes/0.txt", "notes/1.txt", "notes/2.txt"]
    assert mlflow.artifacts.load_text(f"runs:/{run_id}/notes/2.txt") == "note 2"
    assert sorted(refused) == list(range(3, 10))  # the 4th and every later one
    first = refused[3]
    assert isinstance(first, BudgetExceeded) and isinstance(first, GuardTripped)
    assert "max_artifact_writes" in str(first)
    assert "notes/3.txt" in str(first)
    assert guard.trip is not None and guard.trip.guard == "max_artifact_writes"
    assert guard.usage.artifact_writes == 3
    assert guard.usage.artifact_bytes == sum(user_files(run_id).values())
    logged = metrics(run_id)
    assert logged["runguard.agent.artifact_writes"] == 3
    assert logged["runguard.agent.artifact_bytes"] == sum(user_files(run_id).values())


def test_the_artifact_trip_raises_at_exit_when_the_agent_swallowed_it(tracking: str) -> None:
    with pytest.raises(ArtifactBudgetExceeded), mlflow.start_run(), RunGuard(max_artifact_writes=1):
        mlflow.log_text("a", "a.txt")
        with contextlib.suppress(ArtifactBudgetExceeded):
            mlflow.log_text("b", "b.txt")


# -- every artifact API is counted as the files it uploads -------------------------------


def _log_artifact_file(run_id: str, tmp: Path) -> None:
    path = tmp / "report.txt"
    path.write_text("report " * 50)
    mlflow.log_artifact(str(path), artifact_path="reports")


def _three_files(tmp: Path) -> Path:
    folder = tmp / "outputs"
    (folder / "sub").mkdir(parents=True)
    for name, text in (("a.txt", "alpha"), ("b.txt", "beta" * 30), ("sub/c.txt", "gamma")):
        (folder / name).write_text(text)
    return folder


def _log_artifacts_dir(run_id: str, tmp: Path) -> None:
    mlflow.log_artifacts(str(_three_files(tmp)), artifact_path="out")


def _log_artifact_of_a_dir(run_id: str, tmp: Path) -> None:
    mlflow.log_artifact(str(_three_files(tmp)))


def _log_dict(run_id: str, tmp: Path) -> None:
    mlflow.log_dict({"k": list(range(20))}, "cfg/settings.json")


def _log_dict_yaml(run_id: str, tmp: Path) -> None:
    mlflow.log_dict({"k": "v"}, "cfg/settings.yaml")


def _log_text(run_id: str, tmp: Path) -> None:
    mlflow.log_text("hello\n" * 10, "hello.txt")


def _client_log_text(run_id: str, tmp: Path) -> None:
    MlflowClient().log_text(run_id, "from the client", "client/notes.txt")


def _client_log_dict(run_id: str, tmp: Path) -> None:
    MlflowClient().log_dict(run_id, {"a": 1}, "client/d.json")


def _client_log_artifact(run_id: str, tmp: Path) -> None:
    path = tmp / "raw.bin"
    path.write_bytes(b"\x00" * 333)
    MlflowClient().log_artifact(run_id, str(path))


def _client_log_artifacts(run_id: str, tmp: Path) -> None:
    MlflowClient().log_artifacts(run_id, str(_three_files(tmp)), "client-out")


def _client_log_stream(run_id: str, tmp: Path) -> None:
    MlflowClient().log_stream(run_id, io.BytesIO(b"streamed bytes" * 10), "stream/s.bin")


def _log_image_file(run_id: str, tmp: Path) -> None:
    mlflow.log_image(np.full((8, 8, 3), 200, dtype=np.uint8), artifact_file="img/square.png")


def _log_image_key_sync(run_id: str, tmp: Path) -> None:
    # a time-stepped image: the image and its compressed copy
    mlflow.log_image(np.zeros((8, 8, 3), dtype=np.uint8), key="frames", step=1, synchronous=True)


def _log_image_key_async(run_id: str, tmp: Path) -> None:
    mlflow.log_image(np.zeros((8, 8, 3), dtype=np.uint8), key="frames", step=2, synchronous=False)
    mlflow.flush_artifact_async_logging()


def _log_figure(run_id: str, tmp: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figure = Figure()
    figure.add_subplot().plot([1, 2, 3], [3, 1, 2])
    mlflow.log_figure(figure, "plots/line.png")


def _log_table(run_id: str, tmp: Path) -> None:
    mlflow.log_table({"question": ["a?", "b?"], "answer": ["a", "b"]}, artifact_file="t.json")


# (how it writes, the files it uploads, whether the bytes counted are the bytes stored)
API_CASES: list[tuple[Callable[[str, Path], None], int, bool]] = [
    (_log_artifact_file, 1, True),
    (_log_artifacts_dir, 3, True),
    (_log_artifact_of_a_dir, 3, True),
    (_log_dict, 1, True),
    (_log_dict_yaml, 1, True),
    (_log_text, 1, True),
    (_client_log_text, 1, True),
    (_client_log_dict, 1, True),
    (_client_log_artifact, 1, True),
    (_client_log_artifacts, 3, True),
    (_client_log_stream, 1, True),
    (_log_image_file, 1, True),
    (_log_image_key_sync, 2, True),
    # not encoded yet when counted: its raw size is charged, an estimate
    (_log_image_key_async, 2, False),
    (_log_figure, 1, True),
    (_log_table, 1, True),
]


@pytest.mark.parametrize(
    ("write", "files", "exact_bytes"), API_CASES, ids=[c[0].__name__[1:] for c in API_CASES]
)
def test_each_artifact_api_is_counted_as_the_files_it_uploads(
    tracking: str,
    tmp_path: Path,
    write: Callable[[str, Path], None],
    files: int,
    exact_bytes: bool,
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    with mlflow.start_run() as run, RunGuard(name="api") as guard:
        before = guard.usage.artifact_writes
        write(run.info.run_id, source)
        counted = guard.usage
    on_run = user_files(run.info.run_id)
    assert before == 0
    assert len(on_run) == files, sorted(on_run)
    assert counted.artifact_writes == files
    if exact_bytes:
        assert counted.artifact_bytes == sum(on_run.values())
    else:
        assert counted.artifact_bytes > 0
    assert metrics(run.info.run_id)["runguard.api.artifact_writes"] == files
    assert guard.usage == counted  # RunGuard's own exit writes were not counted


def test_a_directory_write_that_would_cross_the_ceiling_uploads_none_of_its_files(
    tracking: str, tmp_path: Path
) -> None:
    folder = _three_files(tmp_path)
    with mlflow.start_run() as run, RunGuard(max_artifact_writes=4, raise_on_exit=False) as guard:
        mlflow.log_text("one", "one.txt")
        mlflow.log_text("two", "two.txt")
        with pytest.raises(ArtifactBudgetExceeded):
            mlflow.log_artifacts(str(folder), artifact_path="out")  # 2 + 3 > 4
        mlflow.log_text("three", "three.txt")  # 2 + 1 still fits
    assert sorted(user_files(run.info.run_id)) == ["one.txt", "three.txt", "two.txt"]
    assert guard.usage.artifact_writes == 3


# -- the bytes ceiling ---------------------------------------------------------------------


def test_the_write_that_crosses_max_artifact_bytes_is_refused_and_not_uploaded(
    tracking: str,
) -> None:
    with mlflow.start_run() as run, RunGuard(max_artifact_bytes=100, raise_on_exit=False) as guard:
        mlflow.log_text("x" * 40, "small-1.txt")
        mlflow.log_text("y" * 40, "small-2.txt")
        with pytest.raises(ArtifactBudgetExceeded, match="max_artifact_bytes") as refused:
            mlflow.log_text("z" * 40, "too-much.txt")
    on_run = user_files(run.info.run_id)
    assert on_run == {"small-1.txt": 40, "small-2.txt": 40}
    assert "too-much.txt" in str(refused.value)
    assert guard.usage.artifact_bytes == 80
    assert guard.usage.artifact_writes == 2
    assert metrics(run.info.run_id)["runguard.artifact_bytes"] == 80


def test_one_write_bigger_than_the_bytes_ceiling_is_refused_first_thing(
    tracking: str, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x01" * 5000)
    with (
        mlflow.start_run() as run,
        RunGuard(max_artifact_bytes=4096, raise_on_exit=False) as guard,
        pytest.raises(ArtifactBudgetExceeded, match=r"big\.bin"),
    ):
        mlflow.log_artifact(str(big))
    assert user_files(run.info.run_id) == {}
    assert guard.usage.artifact_bytes == 0


# -- trips and LLM calls -----------------------------------------------------------------


def test_after_an_artifact_trip_the_next_llm_call_is_refused_unsent(
    tracking: str, fake: FakeProvider, llm: Any
) -> None:
    with mlflow.start_run(), RunGuard(max_artifact_writes=1, raise_on_exit=False) as guard:
        ask(llm)
        mlflow.log_text("kept", "kept.txt")
        with pytest.raises(ArtifactBudgetExceeded):
            mlflow.log_text("refused", "refused.txt")
        sent = fake.wire_count
        with pytest.raises(GuardTripped) as refused:
            ask(llm)
    assert sent == 1
    assert fake.wire_count == sent  # the refused call never left the SDK
    assert refused.value.trip.guard == "max_artifact_writes"
    assert guard.usage.calls == 1


def test_an_llm_trip_does_not_block_later_artifact_writes(
    tracking: str, fake: FakeProvider, llm: Any
) -> None:
    with (
        mlflow.start_run() as run,
        RunGuard(max_calls=1, max_artifact_writes=10, raise_on_exit=False) as guard,
    ):
        ask(llm)
        with pytest.raises(GuardTripped):
            ask(llm)
        assert guard.tripped
        for i in range(3):
            mlflow.log_text(f"saved {i}", f"after-trip/{i}.txt")
        mlflow.log_dict({"state": "final"}, "after-trip/state.json")
    assert fake.wire_count == 1
    assert len(user_files(run.info.run_id)) == 4
    assert guard.usage.artifact_writes == 4
    assert guard.trip is not None and guard.trip.guard == "max_calls"  # still the first trip


# -- which writes a guard sees --------------------------------------------------------------


def test_writes_outside_any_guard_are_neither_counted_nor_refused(tracking: str) -> None:
    with mlflow.start_run() as run:
        for i in range(5):
            mlflow.log_text(f"free {i}", f"free/{i}.txt")
        with RunGuard(max_artifact_writes=2, raise_on_exit=False) as guard:
            mlflow.log_text("inside", "inside/0.txt")
        for i in range(5, 8):
            mlflow.log_text(f"free {i}", f"free/{i}.txt")  # after the guard exited
    on_run = user_files(run.info.run_id)
    assert len([p for p in on_run if p.startswith("free/")]) == 8
    assert "inside/0.txt" in on_run
    assert guard.usage.artifact_writes == 1
    assert not guard.tripped


def test_nested_guards_each_count_and_the_inner_ceiling_refuses(tracking: str) -> None:
    with mlflow.start_run() as run, RunGuard(name="outer") as outer:
        with RunGuard(name="inner", max_artifact_writes=2, raise_on_exit=False) as inner:
            mlflow.log_text("1", "n/1.txt")
            mlflow.log_text("2", "n/2.txt")
            with pytest.raises(ArtifactBudgetExceeded) as refused:
                mlflow.log_text("3", "n/3.txt")
        mlflow.log_text("after", "n/after.txt")  # the outer guard has no ceiling
    assert sorted(user_files(run.info.run_id)) == ["n/1.txt", "n/2.txt", "n/after.txt"]
    assert refused.value.trip.run == "inner"
    assert inner.usage.artifact_writes == 2
    assert outer.usage.artifact_writes == 3  # the two the inner admitted, and its own
    assert not outer.tripped
    logged = metrics(run.info.run_id)
    assert logged["runguard.inner.artifact_writes"] == 2
    assert logged["runguard.outer.artifact_writes"] == 3


def test_an_outer_ceiling_refuses_writes_made_inside_an_inner_guard(tracking: str) -> None:
    with (
        mlflow.start_run() as run,
        RunGuard(max_artifact_writes=1, raise_on_exit=False) as outer,
        RunGuard(raise_on_exit=False) as inner,
    ):
        mlflow.log_text("1", "1.txt")
        with pytest.raises(ArtifactBudgetExceeded):
            mlflow.log_text("2", "2.txt")
    assert sorted(user_files(run.info.run_id)) == ["1.txt"]
    assert outer.usage.artifact_writes == inner.usage.artifact_writes == 1
    assert outer.tripped and not inner.tripped


def test_a_process_scoped_guard_counts_writes_from_worker_threads(tracking: str) -> None:
    with (
        mlflow.start_run() as run,
        RunGuard(scope="process", max_artifact_writes=2, raise_on_exit=False) as guard,
    ):
        outcomes: list[str] = []

        def work(i: int) -> None:
            try:
                MlflowClient().log_text(run.info.run_id, f"worker {i}", f"workers/{i}.txt")
                outcomes.append("written")
            except ArtifactBudgetExceeded:
                outcomes.append("refused")

        for i in range(3):  # one after another: which one is refused is then known
            thread = threading.Thread(target=work, args=(i,))
            thread.start()
            thread.join()
    assert outcomes == ["written", "written", "refused"]
    assert sorted(user_files(run.info.run_id)) == ["workers/0.txt", "workers/1.txt"]
    assert guard.usage.artifact_writes == 2


def test_a_context_scoped_guard_does_not_see_a_plain_threads_writes(tracking: str) -> None:
    with mlflow.start_run() as run, RunGuard(max_artifact_writes=1) as guard:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for i in range(3):
                    MlflowClient().log_text(run.info.run_id, f"thread {i}", f"thread/{i}.txt")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert errors == []
    assert len(user_files(run.info.run_id)) == 3  # none refused
    assert guard.usage.artifact_writes == 0


def test_propagate_carries_a_context_scoped_guard_into_a_thread(tracking: str) -> None:
    with mlflow.start_run() as run, RunGuard(max_artifact_writes=5) as guard:
        work = runguard.propagate(
            lambda: MlflowClient().log_text(run.info.run_id, "propagated", "p.txt")
        )
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert list(user_files(run.info.run_id)) == ["p.txt"]
    assert guard.usage.artifact_writes == 1


def test_runguards_own_writes_are_not_counted_by_an_enclosing_process_guard(
    tracking: str,
) -> None:
    # The exit writes (ledger.json, artifacts.json) are made on RunGuard's
    # background thread, which a process-scoped guard covers.
    with (
        mlflow.start_run() as run,
        RunGuard(scope="process", max_artifact_writes=1, raise_on_exit=False) as outer,
    ):
        for name in ("a", "b", "c"):
            with RunGuard(name=name, consolidate_artifacts=True) as inner:
                mlflow.log_text("held", f"{name}.txt")
                inner.log_tool_output("s", "t", "out")
        assert drain(10)
        assert outer.usage.artifact_writes == 0
        assert not outer.tripped
    on_run = stored(run.info.run_id)
    for name in ("a", "b", "c"):
        assert f"runguard/{name}/ledger.json" in on_run
        assert f"runguard/{name}/artifacts.json" in on_run
    assert outer.usage.artifact_writes == 0


# -- consolidation ---------------------------------------------------------------------


def test_consolidation_writes_many_dicts_as_one_artifact_in_order(tracking: str) -> None:
    contents = [{"i": i, "text": f"item {i}"} for i in range(100)]
    with (
        mlflow.start_run() as run,
        RunGuard(consolidate_artifacts=True, max_artifact_writes=1) as guard,
    ):
        for i, content in enumerate(contents):
            mlflow.log_dict(content, f"dicts/{i}.json")
        assert guard.usage.artifact_writes == 0  # held: no file of its own
        assert guard.usage.artifact_bytes > 0  # but its bytes count
    run_id = run.info.run_id
    on_run = stored(run_id)
    assert not [p for p in on_run if p.startswith("dicts/")]
    assert [p for p in on_run if p.endswith("artifacts.json")] == ["runguard/artifacts.json"]
    payload = held(run_id)
    assert payload["guard"] is None
    entries = payload["entries"]
    assert [e["content"] for e in entries] == contents
    assert [e["name"] for e in entries] == [f"dicts/{i}.json" for i in range(100)]
    assert [e["seq"] for e in entries] == list(range(100))
    assert {e["kind"] for e in entries} == {"dict"}
    assert metrics(run_id)["runguard.artifact_writes"] == 0
    assert metrics(run_id)["runguard.artifact_bytes"] == guard.usage.artifact_bytes


def test_consolidation_makes_the_same_uploads_for_one_or_a_hundred_writes(
    tracking: str, uploads: list[str]
) -> None:
    def uploads_for(count: int) -> int:
        uploads.clear()
        with mlflow.start_run() as run, RunGuard(consolidate_artifacts=True) as guard:
            for i in range(count):
                mlflow.log_dict({"i": i}, f"d/{i}.json")
        assert drain(10)
        assert len(held(run.info.run_id)["entries"]) == count
        assert guard.usage.artifact_writes == 0
        return len(uploads)

    one, hundred = uploads_for(1), uploads_for(100)
    assert one == hundred == 2  # the ledger and the consolidated artifact

    # and without consolidation, one upload per call (the wrapper sees them)
    uploads.clear()
    with mlflow.start_run(), RunGuard() as plain:
        for i in range(10):
            mlflow.log_dict({"i": i}, f"d/{i}.json")
    assert drain(10)
    assert len(uploads) == 10 + 1
    assert plain.usage.artifact_writes == 10


def test_a_named_guard_writes_its_own_consolidated_artifact(tracking: str) -> None:
    with mlflow.start_run() as run, RunGuard(name="researcher", consolidate_artifacts=True):
        mlflow.log_text("draft", "draft.txt")
    payload = held(run.info.run_id, "researcher")
    assert payload["guard"] == "researcher"
    assert [(e["kind"], e["name"], e["content"]) for e in payload["entries"]] == [
        ("text", "draft.txt", "draft")
    ]
    assert "runguard/artifacts.json" not in stored(run.info.run_id)


def test_a_text_over_256_kib_is_uploaded_as_a_file_even_when_consolidating(
    tracking: str,
) -> None:
    big = "x" * (SMALL_BYTES + 1)
    with mlflow.start_run() as run, RunGuard(consolidate_artifacts=True) as guard:
        mlflow.log_text("small", "small.txt")
        mlflow.log_text(big, "big.txt")
    assert SMALL_BYTES == 256 * 1024
    assert user_files(run.info.run_id) == {"big.txt": len(big)}
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/big.txt") == big
    assert [e["name"] for e in held(run.info.run_id)["entries"]] == ["small.txt"]
    assert guard.usage.artifact_writes == 1
    assert guard.usage.artifact_bytes == len(big) + len("small")


def test_a_text_of_exactly_256_kib_is_still_held(tracking: str) -> None:
    edge = "y" * SMALL_BYTES
    with mlflow.start_run() as run, RunGuard(consolidate_artifacts=True):
        mlflow.log_text(edge, "edge.txt")
    assert user_files(run.info.run_id) == {}
    assert held(run.info.run_id)["entries"][0]["content"] == edge


def test_tool_outputs_and_texts_are_held_in_call_order_with_step_and_tool(
    tracking: str,
) -> None:
    with mlflow.start_run() as run, RunGuard(consolidate_artifacts=True) as guard:
        mlflow.log_text("plan v1", "plan.txt")
        guard.log_tool_output(1, "search", {"hits": ["a", "b"]})
        with step("plan"):
            mlflow.log_text("plan v2", "plan.txt")
            with step("refine"):
                mlflow.log_dict({"refined": True}, "refined.json")
        guard.log_tool_output("write", "editor", "final text")
        mlflow.log_text("done", "done.txt")
    entries = held(run.info.run_id)["entries"]
    assert [(e["kind"], e["name"], e["step"], e["tool"], e["content"]) for e in entries] == [
        ("text", "plan.txt", None, None, "plan v1"),
        ("tool_output", None, 1, "search", {"hits": ["a", "b"]}),
        ("text", "plan.txt", "plan", None, "plan v2"),
        ("dict", "refined.json", "plan/refine", None, {"refined": True}),
        ("tool_output", None, "write", "editor", "final text"),
        ("text", "done.txt", None, None, "done"),
    ]
    assert [e["seq"] for e in entries] == list(range(6))
    assert all(e["time"].endswith("+00:00") for e in entries)
    assert [e["content"] for e in guard.artifacts] == [e["content"] for e in entries]
    assert user_files(run.info.run_id) == {}


def test_tool_outputs_are_held_without_consolidate_artifacts(tracking: str) -> None:
    with mlflow.start_run() as run, RunGuard(name="tools") as guard:
        guard.log_tool_output("s1", "calc", 42)
        mlflow.log_text("uploaded as usual", "usual.txt")
    assert list(user_files(run.info.run_id)) == ["usual.txt"]
    assert [(e["tool"], e["content"]) for e in held(run.info.run_id, "tools")["entries"]] == [
        ("calc", 42)
    ]
    assert guard.usage.artifact_writes == 1


def test_held_writes_go_to_the_run_they_were_logged_to(tracking: str) -> None:
    other = MlflowClient().create_run(experiment_id())
    other_id = other.info.run_id
    with mlflow.start_run() as run, RunGuard(consolidate_artifacts=True) as guard:
        mlflow.log_text("to the active run", "mine.txt")
        MlflowClient().log_text(other_id, "to the other run", "theirs.txt")
        guard.log_tool_output("s", "t", "to the guard's run")
    mine = held(run.info.run_id)["entries"]
    theirs = held(other_id)["entries"]
    assert [e["content"] for e in mine] == ["to the active run", "to the guard's run"]
    assert [e["content"] for e in theirs] == ["to the other run"]
    assert user_files(run.info.run_id) == user_files(other_id) == {}


def test_held_bytes_count_against_max_artifact_bytes(tracking: str) -> None:
    with (
        mlflow.start_run() as run,
        RunGuard(consolidate_artifacts=True, max_artifact_bytes=100, raise_on_exit=False) as guard,
    ):
        mlflow.log_text("a" * 60, "a.txt")
        with pytest.raises(ArtifactBudgetExceeded):
            mlflow.log_text("b" * 60, "b.txt")
    assert [e["name"] for e in held(run.info.run_id)["entries"]] == ["a.txt"]
    assert guard.usage.artifact_bytes == 60


def test_a_held_dict_is_what_it_was_when_logged(tracking: str) -> None:
    with mlflow.start_run() as run, RunGuard(consolidate_artifacts=True):
        state: dict[str, int] = {}
        for i in range(3):
            state["i"] = i
            mlflow.log_dict(state, f"state/{i}.json")
    assert [e["content"] for e in held(run.info.run_id)["entries"]] == [
        {"i": 0},
        {"i": 1},
        {"i": 2},
    ]


def test_a_held_tool_output_is_what_it_was_when_logged(tracking: str) -> None:
    with mlflow.start_run() as run, RunGuard() as guard:
        hits = ["a"]
        guard.log_tool_output("search", "web", hits)
        hits.append("b")
    assert [e["content"] for e in held(run.info.run_id)["entries"]] == [["a"]]


def test_a_started_run_gets_all_held_entries(tracking: str) -> None:
    with RunGuard(mlflow_run="start", name="s", consolidate_artifacts=True) as guard:
        MlflowClient().log_text(run_of(guard), "text entry", "x.txt")
        guard.log_tool_output("st", "tool", "tool entry")
    entries = held(run_of(guard), "s")["entries"]
    assert [e["content"] for e in entries] == ["text entry", "tool entry"]


def test_nested_unnamed_consolidating_guards_lose_nothing(tracking: str) -> None:
    with (
        mlflow.start_run() as run,
        RunGuard(consolidate_artifacts=True),
    ):
        mlflow.log_text("outer entry", "o.txt")
        with RunGuard(consolidate_artifacts=True):
            mlflow.log_text("inner entry", "i.txt")
    on_run = stored(run.info.run_id)
    contents = [
        e["content"]
        for path in on_run
        if re.fullmatch(r"runguard/artifacts(\.\d+)?\.json", path)
        for e in mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{path}")["entries"]
    ]
    assert sorted(contents) == ["inner entry", "outer entry"]


# -- nothing held is lost -----------------------------------------------------------------


def test_held_entries_are_written_when_an_llm_trip_raises_out_of_the_block(
    tracking: str, llm: Any
) -> None:
    with (
        pytest.raises(GuardTripped),
        mlflow.start_run() as run,
        RunGuard(max_calls=1, consolidate_artifacts=True) as guard,
    ):
        mlflow.log_text("before the trip", "before.txt")
        guard.log_tool_output("s", "search", "results")
        ask(llm)
        ask(llm)  # refused: raises out of the block
    assert [e["content"] for e in held(run.info.run_id)["entries"]] == [
        "before the trip",
        "results",
    ]


def test_held_entries_are_written_when_the_block_raises(tracking: str) -> None:
    with (
        pytest.raises(ValueError, match="agent bug"),
        mlflow.start_run() as run,
        RunGuard(consolidate_artifacts=True) as guard,
    ):
        mlflow.log_dict({"partial": True}, "partial.json")
        guard.log_tool_output(3, "parse", "half done")
        raise ValueError("agent bug")
    assert [e["content"] for e in held(run.info.run_id)["entries"]] == [
        {"partial": True},
        "half done",
    ]


def test_without_a_run_tool_outputs_stay_on_the_guard_with_one_warning(tracking: str) -> None:
    assert mlflow.active_run() is None
    with pytest.warns(RuntimeWarning) as caught:
        with RunGuard() as guard:
            guard.log_tool_output("s", "search", "one")
            guard.log_tool_output("s", "search", "two")
        assert drain(10)
    ours = [str(w.message) for w in caught if "runguard" in str(w.message)]
    assert len(ours) == 1, ours
    assert "2 held artifacts have no MLflow run" in ours[0]
    assert [e["content"] for e in guard.artifacts] == ["one", "two"]
    assert mlflow.search_runs(search_all_experiments=True).empty  # no run was started


# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_artifact_writes", "max_artifact_bytes"])
@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("3", TypeError), (True, TypeError)],
)
def test_bad_artifact_ceilings_are_refused_naming_the_field(
    field: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises((ValueError, TypeError), match=field) as refused:
        settings: dict[str, Any] = {field: value}
        RunGuard(**settings)
    assert isinstance(refused.value, error), repr(refused.value)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_consolidate_artifacts_must_be_a_bool(value: object) -> None:
    with pytest.raises(TypeError, match="consolidate_artifacts"):
        RunGuard(consolidate_artifacts=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [{"max_artifact_writes": 3}, {"max_artifact_bytes": 1000}, {"consolidate_artifacts": True}],
)
def test_artifact_settings_need_the_mlflow_integration(settings: dict[str, Any]) -> None:
    (field,) = settings
    with pytest.raises(ValueError, match=field):
        RunGuard(mlflow=False, **settings)


def test_log_tool_output_is_refused_after_exit_and_checks_its_tool() -> None:
    with RunGuard(mlflow=False) as guard, pytest.raises(TypeError, match="tool"):
        guard.log_tool_output("s", 3, "out")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="exited"):
        guard.log_tool_output("s", "search", "late")
    assert guard.artifacts == ()


# -- feature detection --------------------------------------------------------------------


def test_an_install_without_a_tracking_client_is_one_warning_at_exit(
    tracking: str, monkeypatch: pytest.MonkeyPatch, llm: Any
) -> None:
    monkeypatch.setattr(rg_mlflow, "_warned", set())  # warned once per process
    monkeypatch.delattr(mlflow, "MlflowClient")  # as in an mlflow-tracing install
    with pytest.warns(RuntimeWarning) as caught:
        with RunGuard(mlflow_run="0123456789abcdef0123456789abcdef", max_calls=5) as guard:
            ask(llm)
        assert drain(10)
    ours = [str(w.message) for w in caught if "runguard" in str(w.message)]
    assert len(ours) == 1, ours
    assert "tracking client" in ours[0]
    assert guard.usage.calls == 1


def test_a_trip_marks_the_span_when_update_current_trace_is_missing(
    tracking: str, monkeypatch: pytest.MonkeyPatch, llm: Any
) -> None:
    monkeypatch.delattr(mlflow, "update_current_trace")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # marking must not fail and warn
        with (
            RunGuard(max_calls=1, raise_on_exit=False) as guard,
            mlflow.start_span("agent") as span,
        ):
            ask(llm)
            with pytest.raises(GuardTripped):
                ask(llm)
            trace_id = span.trace_id
    mlflow.flush_trace_async_logging()
    trace = mlflow.get_trace(trace_id)
    assert trace is not None
    root = next(s for s in trace.data.spans if s.name == "agent")
    assert root.attributes["runguard.trip_guard"] == "max_calls"
    assert [e.name for e in root.events] == ["runguard.trip"]
    assert "runguard.tripped" not in trace.info.tags  # nothing to tag the trace with
    assert guard.tripped


# -- mlflow_run="start" ---------------------------------------------------------------------


def test_mlflow_run_start_creates_logs_to_and_finishes_a_run(tracking: str) -> None:
    assert mlflow.active_run() is None
    with RunGuard(mlflow_run="start", name="agent-7", max_artifact_writes=5) as guard:
        assert mlflow.active_run() is None
        run_id = run_of(guard)  # waits until RunGuard created it
        MlflowClient().log_text(run_id, "a note", "notes/n.txt")
        guard.log_tool_output("s", "search", "found it")
    assert mlflow.active_run() is None
    assert drain(10)
    run = MlflowClient().get_run(run_id)
    assert run.info.run_name == "agent-7"
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == experiment_id()
    assert run.data.tags["runguard.started"] == "true"
    assert run.data.metrics["runguard.agent-7.artifact_writes"] == 1
    assert run.data.tags["runguard.agent-7.tripped"] == "false"
    on_run = stored(run_id)
    assert "notes/n.txt" in on_run and "runguard/agent-7/ledger.json" in on_run
    assert [e["content"] for e in held(run_id, "agent-7")["entries"]] == ["found it"]
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1


def test_mlflow_run_start_ends_a_tripped_guards_run_failed(tracking: str, llm: Any) -> None:
    with RunGuard(mlflow_run="start", name="tripper", max_calls=1, raise_on_exit=False) as guard:
        ask(llm)
        with pytest.raises(GuardTripped):
            ask(llm)
    assert mlflow.active_run() is None
    run_id = run_of(guard)
    assert drain(10)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.info.run_name == "tripper"
    assert run.data.tags["runguard.tripper.trip_guard"] == "max_calls"


def test_mlflow_run_start_ends_an_artifact_tripped_guards_run_failed(tracking: str) -> None:
    with RunGuard(mlflow_run="start", max_artifact_writes=1, raise_on_exit=False) as guard:
        run_id = run_of(guard)
        MlflowClient().log_text(run_id, "1", "1.txt")
        with pytest.raises(ArtifactBudgetExceeded):
            MlflowClient().log_text(run_id, "2", "2.txt")
    assert user_files(run_id) == {"1.txt": 1}
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
