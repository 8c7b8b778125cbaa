"""An MLflow evaluation whose fan-out is fitted to a call budget before it starts, and held to it.

Run it with ``python examples/eval_fanout.py``. It needs ``mlflow`` and ``openai``
and no API key: the agent's model is runguard's FakeProvider and the judges'
model is runguard's FakeJudge, a loopback server. Sixty questions scored by
three LLM judges make four LLM calls a row, about 240 in all. With
``max_llm_calls=120``, ``guarded_evaluate`` works that out before the first
call, evaluates the sample of rows that fits, and counts the agent's calls and
the judges' alike, refusing any call that would cross the ceiling. With
``on_over_budget="raise"`` it refuses the whole evaluation instead, before
anything is sent. Everything is written to a temporary directory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
from mlflow.genai.scorers import Correctness, Guidelines, RelevanceToQuery

from runguard import BudgetExceeded, estimate_eval_calls, guarded_evaluate
from runguard.integrations.mlflow import drain
from runguard.testing import FakeJudge, FakeProvider, Reply

MAX_LLM_CALLS = 120

# --- illustrative: a scripted agent model, offline judges -----------------------------------------
# A real agent would use `client = openai.OpenAI()`, and the judges a real OpenAI key.
fake = FakeProvider(default=Reply(text="Lisbon is the capital of Portugal."))
client = fake.openai(max_retries=0)
os.environ["OPENAI_API_KEY"] = "sk-not-a-real-key"  # read by MLflow's judges
os.environ["MLFLOW_MODEL_CATALOG_URI"] = ""  # no price look-ups over the network
os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] = "4"  # kinder to a sqlite tracking store
# --------------------------------------------------------------------------------------------------


def answer(question: str) -> str:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": question}], max_tokens=200
    )
    return reply.choices[0].message.content or ""


DATA = [
    {
        "inputs": {"question": f"Customer {n}: what is the capital of Portugal?"},
        "expectations": {"expected_response": "Lisbon"},
    }
    for n in range(60)
]
SCORERS = [
    Correctness(),
    RelevanceToQuery(),
    Guidelines(name="concise", guidelines="The answer is a single sentence."),
]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, FakeJudge() as judge:
        # --- illustrative: MLflow's judges post to the loopback judge -----------------------------
        os.environ["OPENAI_BASE_URL"] = judge.url
        # ------------------------------------------------------------------------------------------
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        artifacts = Path(tmp, "artifacts").as_uri()
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("faq-eval", artifacts))

        estimate = estimate_eval_calls(DATA, SCORERS, answer, max_llm_calls=MAX_LLM_CALLS)
        print(f"max_llm_calls: {MAX_LLM_CALLS}")
        print(f"rows: {estimate.rows}")
        print(f"expected LLM calls: {estimate.llm_calls}")
        print(f"worst case, every retry taken: {estimate.worst_llm_calls}")
        print(f"rows that fit: {estimate.fits}")
        print(f"expected LLM calls for those rows: {estimate.for_rows(estimate.fits)}")

        try:
            guarded_evaluate(
                DATA, SCORERS, answer, max_llm_calls=MAX_LLM_CALLS, on_over_budget="raise"
            )
        except BudgetExceeded as exc:
            print(f"on_over_budget='raise': {type(exc).__name__}: {exc}")
        print(f"requests sent by the refused evaluation: {fake.wire_count + judge.count}")

        result = guarded_evaluate(DATA, SCORERS, answer, max_llm_calls=MAX_LLM_CALLS)
        print(f"rows total: {result.rows_total}")
        print(f"rows kept: {result.rows_kept}")
        print(f"rows scored: {result.rows_scored}")
        print(f"tripped: {result.trip.guard if result.trip else 'no'}")
        print(f"calls RunGuard admitted: {result.usage.calls}")
        # --- illustrative: only the fakes can count what really left the process ------------------
        print(f"agent requests that reached the provider: {fake.count('/chat/completions')}")
        print(f"judge requests that reached the judge: {judge.count}")
        # ------------------------------------------------------------------------------------------

        drain()  # the summary is written to the evaluation's run in the background
        run = mlflow.MlflowClient().get_run(result.run_id)
        for key, value in sorted({**run.data.tags, **run.data.metrics}.items()):
            if key.startswith("runguard.eval."):
                print(f"{key}: {value:g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
