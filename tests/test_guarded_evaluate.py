"""guarded_evaluate and estimate_eval_calls, against real MLflow evaluations.

Ground truth is what reached the two wires: the agent's (the real openai SDK
over runguard's in-memory FakeProvider) and the judge's (FakeJudge, a
loopback HTTP server that MLflow's judges post to with ``requests``). Every
question carries a unique id, so each wire says which rows were asked and
judged.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow.genai import make_judge
from mlflow.genai.scorers import Correctness, Guidelines, RelevanceToQuery, scorer
from mlflow.genai.scorers.builtin_scorers import RegexMatch
from mlflow.metrics.genai import make_genai_metric

from runguard import (
    BudgetExceeded,
    Price,
    RateLimitStorm,
    RunGuard,
    estimate_eval_calls,
    guarded_evaluate,
)
from runguard.integrations.mlflow import drain
from runguard.testing import FakeJudge, FakeProvider, Reply

QUESTION = re.compile(r"question-\d{3}")


@pytest.fixture(autouse=True)
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("MLFLOW_MODEL_CATALOG_URI", "")  # no price lookups over the network
    # MLflow's default of 10 row workers contends on sqlite; 4 keeps runs fast
    monkeypatch.setenv("MLFLOW_GENAI_EVAL_MAX_WORKERS", "4")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("evals")
    yield
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default


@pytest.fixture
def judge(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeJudge]:
    with FakeJudge() as served:
        monkeypatch.setenv("OPENAI_BASE_URL", served.url)  # where MLflow's openai judges post
        yield served


@pytest.fixture
def agent() -> FakeProvider:
    return FakeProvider(default=Reply(text="ok"))


def questions(n: int) -> list[dict[str, Any]]:
    return [
        {"inputs": {"question": f"question-{i:03d}"}, "expectations": {"expected_response": "ok"}}
        for i in range(n)
    ]


def predictor(fake: FakeProvider, calls_per_row: int = 1) -> Callable[[str], str]:
    client = fake.openai(max_retries=0)

    def predict(question: str) -> str:
        answer = ""
        for _ in range(calls_per_row):
            reply = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": question}],
                max_tokens=8,
            )
            answer = str(reply.choices[0].message.content)
        return answer

    return predict


def three_judges() -> list[Any]:
    return [Correctness(), RelevanceToQuery(), Guidelines(name="polite", guidelines="Be polite.")]


def asked(fake: FakeProvider) -> Counter[str]:
    """Agent requests on the wire, by question."""
    return Counter(q for r in fake.requests for q in set(QUESTION.findall(json.dumps(r.body))))


def judged(judge: FakeJudge) -> Counter[str]:
    """Judge requests on the wire, by the question they judged."""
    return Counter(q for body in judge.requests for q in set(QUESTION.findall(json.dumps(body))))


# -- the estimate, checked against what MLflow really sends -------------------------------


def test_the_estimate_is_what_mlflow_genai_evaluate_sends(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    @scorer
    def answered(outputs: Any) -> bool:
        return bool(outputs == "ok")

    concise = make_judge(
        name="concise",
        instructions="Is {{ outputs }} a concise answer to {{ inputs }}?",
        model="openai:/gpt-4.1-mini",
    )
    scorers = [*three_judges(), concise, RegexMatch(pattern="ok"), answered]
    data, predict = questions(5), predictor(agent)

    estimate = estimate_eval_calls(data, scorers, predict)
    mlflow.genai.evaluate(data=data, scorers=scorers, predict_fn=predict)

    assert estimate.harness == "genai"
    assert set(estimate.judges) == {"correctness", "relevance_to_query", "polite", "concise"}
    assert set(estimate.other_scorers) == {"regex_match", "answered"}
    assert agent.wire_count == estimate.agent_calls  # rows + the validation run
    assert judge.count == estimate.judge_calls  # rows x LLM judges
    assert estimate.llm_calls == agent.wire_count + judge.count
    assert estimate.validation_calls == 1


def test_the_estimate_is_what_the_legacy_mlflow_models_evaluate_sends(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    metric = helpful()
    data, model = legacy_rows(6), legacy_model(agent)

    estimate = estimate_eval_calls(data, model=model, extra_metrics=[metric])
    with mlflow.start_run():
        mlflow.models.evaluate(  # type: ignore[no-untyped-call]
            model=model, data=data, targets="ground_truth", extra_metrics=[metric]
        )

    assert estimate.harness == "legacy"
    assert agent.wire_count == estimate.agent_calls == 6
    # each LLM metric is tried on the first row before the real pass
    assert judge.count == estimate.judge_calls
    assert estimate.validation_calls == 1


def test_skipping_trace_validation_saves_the_extra_agent_call_in_the_estimate_too(
    agent: FakeProvider, judge: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_GENAI_EVAL_SKIP_TRACE_VALIDATION", "true")
    data, predict = questions(4), predictor(agent)
    estimate = estimate_eval_calls(data, [Correctness()], predict)
    mlflow.genai.evaluate(data=data, scorers=[Correctness()], predict_fn=predict)
    assert agent.wire_count == estimate.agent_calls == 4
    assert judge.count == estimate.judge_calls == 4


@pytest.mark.skipif(
    importlib.util.find_spec("litellm") is not None,
    reason="with litellm installed, MLflow's judges do not retry 429s themselves",
)
def test_the_worst_case_counts_every_retry_on_rate_limits(
    agent: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, predict = questions(1), predictor(agent)
    # measured with a judge answering only 429 (research, section 4.4): 44 judge
    # requests for one row and one judge, 11 once the harness retries nothing
    per_agent_call = (1 + 3) * (1 + 2)  # harness re-runs x the SDK's own attempts
    estimate = estimate_eval_calls(data, [Correctness()], predict)
    assert estimate.worst_llm_calls == estimate.agent_calls * per_agent_call + 44
    monkeypatch.setenv("MLFLOW_GENAI_EVAL_MAX_RETRIES", "0")
    estimate = estimate_eval_calls(data, [Correctness()], predict)
    assert estimate.worst_llm_calls == estimate.agent_calls * 3 + 11


def test_judge_calls_per_row_and_agent_calls_per_row_shape_the_estimate() -> None:
    data = questions(20)
    estimate = estimate_eval_calls(
        data,
        three_judges(),
        lambda question: question,
        agent_calls_per_row=2.5,
        judge_calls_per_row={"polite": 4},
        max_llm_calls=100,
    )
    assert estimate.judges == {"correctness": 1, "relevance_to_query": 1, "polite": 4}
    assert estimate.agent_calls == 53  # (20 rows + 1 validation) x 2.5, rounded up
    assert estimate.judge_calls == 120
    # 11 rows: 30 agent calls (12 x 2.5) + 66 judge calls = 96; 12 rows: 33 + 72 = 105
    assert (estimate.for_rows(11), estimate.for_rows(12)) == (96, 105)
    assert estimate.fits == 11


def test_rows_that_already_hold_outputs_cost_no_agent_calls() -> None:
    rows = [{"inputs": {"q": i}, "outputs": "ok"} for i in range(7)]
    estimate = estimate_eval_calls(rows, [Correctness()])
    assert (estimate.agent_calls, estimate.judge_calls, estimate.validation_calls) == (0, 7, 0)


# -- the bar: the ceiling holds on the wire ------------------------------------------------


def test_200_rows_and_3_judges_never_put_more_than_max_llm_calls_on_the_wire(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    data = questions(200)
    evaluation = guarded_evaluate(data, three_judges(), predictor(agent), max_llm_calls=500, seed=7)

    sent = agent.wire_count + judge.count
    assert sent <= 500
    assert evaluation.usage.calls == sent
    assert evaluation.trip is None
    assert evaluation.rows_total == 200
    assert evaluation.rows_kept == evaluation.estimate.fits < 200
    # every kept row was asked and judged three times, and no other row was touched
    kept = set(asked(agent))
    assert len(kept) == evaluation.rows_kept
    assert all(judged(judge)[q] == 3 for q in kept) and set(judged(judge)) == kept
    assert evaluation.rows_scored == evaluation.rows_kept
    assert len(evaluation.result_df) == evaluation.rows_kept  # MLflow's own result, delegated


def test_an_underestimated_agent_is_still_stopped_call_by_call(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    # the agent really makes 2 calls per row; guarded_evaluate is told 1
    evaluation = guarded_evaluate(
        questions(200), three_judges(), predictor(agent, calls_per_row=2), max_llm_calls=500
    )

    sent = agent.wire_count + judge.count
    assert sent <= 500
    assert evaluation.usage.calls == sent
    assert evaluation.trip is not None and evaluation.trip.guard == "max_calls"
    assert agent.requests, "the agent ran"
    # a row is scored when all three judges judged it; the wire says which did
    fully_judged = [q for q, n in judged(judge).items() if n == 3]
    assert evaluation.rows_scored == len(fully_judged) < evaluation.rows_kept
    # the refusal was not retried by MLflow's harness: no row was asked more than
    # twice per run of the agent (the first row runs once more, to validate tracing)
    assert max(asked(agent).values()) <= 4


def test_sampling_uses_the_seed(agent: FakeProvider, judge: FakeJudge) -> None:
    def kept_with(seed: int) -> set[str]:
        agent.reset()
        guarded_evaluate(
            questions(30), [Correctness()], predictor(agent), max_llm_calls=21, seed=seed
        )
        return set(asked(agent))

    first = kept_with(3)
    assert len(first) == 10  # (21 - 1 validation call) // 2 calls per row
    assert kept_with(3) == first
    assert kept_with(4) != first


def test_over_budget_with_raise_refuses_before_anything_is_sent(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    with pytest.raises(BudgetExceeded, match="max_llm_calls") as refused:
        guarded_evaluate(
            questions(50),
            three_judges(),
            predictor(agent),
            max_llm_calls=100,
            on_over_budget="raise",
        )
    assert agent.wire_count == judge.count == 0
    assert mlflow.search_runs(search_all_experiments=True).empty  # not even a run
    trip = refused.value.trip
    assert (trip.limit, trip.observed) == (100, 201)
    assert trip.details["fits"] == 24
    assert "nothing was sent" in str(refused.value)


def test_fewer_rows_fitting_than_min_rows_is_refused_before_anything_is_sent(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    with pytest.raises(BudgetExceeded, match="min_rows=30"):
        guarded_evaluate(
            questions(50), three_judges(), predictor(agent), max_llm_calls=100, min_rows=30
        )
    assert agent.wire_count == judge.count == 0


def test_the_estimate_and_the_sample_are_logged_on_the_evaluation_run(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    evaluation = guarded_evaluate(
        questions(12), three_judges(), predictor(agent), max_llm_calls=30, name="nightly"
    )
    assert drain(10)
    run = mlflow.MlflowClient().get_run(evaluation.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert metrics["runguard.nightly.estimated_llm_calls"] == evaluation.estimate.llm_calls == 49
    assert metrics["runguard.nightly.estimated_llm_calls_kept"] == 29  # 7 rows x 4 + 1
    assert metrics["runguard.nightly.worst_llm_calls"] == evaluation.estimate.worst_llm_calls
    assert metrics["runguard.nightly.rows_total"] == 12
    assert metrics["runguard.nightly.rows_kept"] == evaluation.rows_kept == 7
    assert metrics["runguard.nightly.rows_scored"] == evaluation.rows_scored == 7
    assert metrics["runguard.nightly.calls"] == agent.wire_count + judge.count
    assert tags["runguard.nightly.sampled"] == "true"
    assert tags["runguard.nightly.tripped"] == "false"
    stored = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "runguard")}
    assert "runguard/nightly" in stored


def test_the_legacy_form_is_sampled_and_its_judges_are_enforced(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    data = legacy_rows(10)
    with mlflow.start_run():
        evaluation = guarded_evaluate(
            data,
            model=legacy_model(agent),
            extra_metrics=[helpful()],
            targets="ground_truth",
            max_llm_calls=15,
        )
    sent = agent.wire_count + judge.count
    assert sent <= 15 and evaluation.usage.calls == sent
    assert evaluation.estimate.harness == "legacy"
    assert evaluation.rows_kept == 7  # 7 agent calls + 7 judge calls + 1 first-row check
    assert len(asked(agent)) == 7 and set(judged(judge)) == set(asked(agent))
    assert evaluation.rows_scored == 7
    assert evaluation.metrics["helpful/v1/mean"] == 5


def test_max_cost_usd_charges_judges_what_the_wire_says_they_cost(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    # USD per million tokens; output cheap, so a judge's 4,096-token worst case still fits
    prices = {model: Price(input=100, output=1) for model in ("gpt-4.1-mini", "gpt-4o-mini")}
    evaluation = guarded_evaluate(
        questions(20), [Correctness()], predictor(agent), max_cost_usd=0.2, prices=prices
    )
    spent = (
        judge.count * (judge.input_tokens * 100 + judge.output_tokens) / 1e6
        + agent.wire_count * (Reply().input_tokens * 100 + Reply().output_tokens) / 1e6
    )
    assert judge.count > 0
    assert spent <= 0.2
    assert evaluation.usage.cost_usd == pytest.approx(spent)
    assert evaluation.trip is not None and evaluation.trip.guard == "max_cost_usd"
    assert evaluation.rows_scored is not None and evaluation.rows_scored < 20


# -- judge calls under any guard -----------------------------------------------------------


def test_a_judge_429_storm_is_cut_off_and_not_retried_by_the_harness(
    agent: FakeProvider,
) -> None:
    with FakeJudge(fail_first=1000) as judge:
        make = make_judge(
            name="ok",
            instructions="Is {{ outputs }} fine?",
            model="openai:/gpt-4.1-mini",
            base_url=judge.url + "/chat/completions",
        )
        with RunGuard(scope="process", max_consecutive_429s=3, raise_on_exit=False) as guard:
            mlflow.genai.evaluate(data=questions(1), scorers=[make], predict_fn=predictor(agent))
    # unguarded, this row costs 44 judge requests (MLflow retries 10 times, its harness 3)
    assert judge.count == 3
    assert guard.usage.rate_limited_attempts == 3
    assert guard.trip is not None and guard.trip.exception is RateLimitStorm


def test_judge_calls_count_against_a_plain_process_guard(
    agent: FakeProvider, judge: FakeJudge
) -> None:
    with RunGuard(scope="process", max_calls=7, raise_on_exit=False) as guard:
        mlflow.genai.evaluate(
            data=questions(4), scorers=[Correctness()], predict_fn=predictor(agent)
        )
    assert agent.wire_count + judge.count == guard.usage.calls == 7
    assert judge.count >= 1
    by_model = guard.ledger.to_dict()["by_model"]
    assert by_model["gpt-4.1-mini"]["calls"] == judge.count
    assert by_model["gpt-4.1-mini"]["input_tokens"] == judge.count * judge.input_tokens


# -- arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "field"),
    [
        ({"max_llm_calls": 0}, ValueError, "max_llm_calls"),
        ({"max_llm_calls": "5"}, TypeError, "max_llm_calls"),
        ({"agent_calls_per_row": -1}, ValueError, "agent_calls_per_row"),
        ({"on_over_budget": "drop"}, ValueError, "on_over_budget"),
        ({"min_rows": 0}, ValueError, "min_rows"),
        ({"seed": "x"}, TypeError, "seed"),
        ({"judge_calls_per_row": {"nope": 2}}, ValueError, "judge_calls_per_row"),
        ({"judge_calls_per_row": {"correctness": -5}}, ValueError, "judge_calls_per_row"),
        ({"judge_calls_per_row": {"correctness": math.nan}}, ValueError, "judge_calls_per_row"),
        ({"judge_calls_per_row": {"correctness": "2"}}, TypeError, "judge_calls_per_row"),
        ({"judge_calls_per_row": [("correctness", 2)]}, TypeError, "judge_calls_per_row"),
        ({"model": lambda df: df}, TypeError, "not both"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(
    agent: FakeProvider, judge: FakeJudge, options: dict[str, Any], error: type, field: str
) -> None:
    with pytest.raises(error, match=field):
        guarded_evaluate(questions(3), [Correctness()], predictor(agent), **options)
    assert agent.wire_count == judge.count == 0


def test_data_that_cannot_be_counted_is_refused() -> None:
    with pytest.raises(ValueError, match="data"):
        estimate_eval_calls(None, [Correctness()])
    with pytest.raises(TypeError, match="rows"):
        estimate_eval_calls(iter([1, 2]), [Correctness()])


# -- legacy helpers ------------------------------------------------------------------------


def helpful() -> Any:
    return make_genai_metric(
        name="helpful",
        definition="How helpful the answer is.",
        grading_prompt="5: fully helpful; 1: not helpful.",
        model="openai:/gpt-4.1-mini",
        parameters={"temperature": 0.0},
        aggregations=["mean"],
        greater_is_better=True,
    )


def legacy_rows(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"inputs": [f"question-{i:03d}" for i in range(n)], "ground_truth": ["ok"] * n}
    )


def legacy_model(fake: FakeProvider) -> Callable[[pd.DataFrame], list[str]]:
    predict = predictor(fake)

    def model(frame: pd.DataFrame) -> list[str]:
        return [predict(question) for question in frame["inputs"]]

    return model
