"""RunGuard keeps guarding with MLflow's autolog on, in either order, and after it re-patches.

MLflow's autolog wraps the SDKs' resource methods (``Completions.create``,
``Messages.create``) and removes and re-applies its wrappers when run again;
RunGuard's hooks sit lower, on the SDKs' base clients, so neither disturbs the
other. ``mlflow.genai.evaluate`` enables autolog for its own run and reverts
it after, and runs rows in thread pools: a process-scoped guard around it sees
every call its rows made. Ground truth: requests on the fake wire, the traces
autolog wrote, and the scores the evaluation computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow.genai.scorers import scorer

from runguard import BudgetExceeded, RunGuard, instrument
from runguard.testing import FakeProvider, Reply

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("autolog")
    yield
    mlflow.openai.autolog(disable=True)
    mlflow.anthropic.autolog(disable=True)
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default


def ask_openai(client: Any) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=8)


def ask_anthropic(client: Any) -> None:
    client.messages.create(model="claude-haiku-4-5", messages=MESSAGES, max_tokens=8)


def calls_until_refused(ask: Any, client: Any, limit: int) -> int:
    sent = 0
    with pytest.raises(BudgetExceeded), RunGuard(max_calls=limit):
        for _ in range(limit + 3):
            ask(client)
            sent += 1
    return sent


def traces() -> int:
    mlflow.flush_trace_async_logging()  # traces are exported in the background
    return len(mlflow.search_traces(return_type="list"))


@pytest.mark.parametrize("order", ["autolog first", "runguard first"])
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_guard_and_autolog_work_together_in_either_order(order: str, provider: str) -> None:
    fake = FakeProvider(default=Reply())
    client = fake.openai(max_retries=0) if provider == "openai" else fake.anthropic(max_retries=0)
    ask = ask_openai if provider == "openai" else ask_anthropic
    autolog = mlflow.openai.autolog if provider == "openai" else mlflow.anthropic.autolog
    if order == "autolog first":
        autolog()
        instrument()
    else:
        instrument()
        with RunGuard():
            ask(client)  # RunGuard's hooks are in place before autolog patches
        autolog()
    before = fake.wire_count
    assert calls_until_refused(ask, client, 3) == 3
    assert fake.wire_count - before == 3  # the refused call never left
    assert traces() >= 3  # autolog still traced every call that was sent


def test_guard_survives_autolog_being_run_again() -> None:
    fake = FakeProvider(default=Reply())
    client = fake.openai(max_retries=0)
    mlflow.openai.autolog()
    assert calls_until_refused(ask_openai, client, 2) == 2
    mlflow.openai.autolog(disable=True)
    mlflow.openai.autolog()  # MLflow removes and re-applies its own patches
    assert calls_until_refused(ask_openai, client, 2) == 2
    assert fake.wire_count == 4


# -- mlflow.genai.evaluate re-runs autolog and reverts its patches ------------------------------


@scorer
def answered(outputs: Any) -> bool:
    """Deterministic: the fake provider always answers "ok"."""
    return bool(outputs == "ok")


@pytest.mark.parametrize("order", ["autolog first", "runguard first"])
def test_guard_counts_every_call_of_an_evaluation_and_still_refuses_after_it(
    order: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_MODEL_CATALOG_URI", "")  # no price lookups over the network
    fake = FakeProvider(default=Reply(text="ok"))
    client = fake.openai(max_retries=0)
    if order == "autolog first":
        mlflow.openai.autolog()
        instrument()
    else:
        instrument()
        with RunGuard():
            ask_openai(client)  # RunGuard's hooks are in place before autolog patches
        mlflow.openai.autolog()

    def predict(question: str) -> str:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": question}], max_tokens=8
        )
        return str(reply.choices[0].message.content)

    rows = [{"inputs": {"question": f"q{i}"}} for i in range(4)]
    before = fake.count("/chat/completions")
    # process scope: the harness runs rows (and its validation call) on pool threads
    with RunGuard(scope="process", max_calls=100) as guard:
        result = mlflow.genai.evaluate(data=rows, scorers=[answered], predict_fn=predict)
    sent = fake.count("/chat/completions") - before
    assert sent >= len(rows)  # one per row, plus the harness's validation call (5 today)
    assert guard.usage.calls == sent
    assert not guard.tripped
    assert result.metrics["answered/mean"] == 1.0  # every row got its answer

    # evaluate has reverted its patches: a new guard still refuses before the wire
    before = fake.wire_count
    assert calls_until_refused(ask_openai, client, 1) == 1
    assert fake.wire_count - before == 1
