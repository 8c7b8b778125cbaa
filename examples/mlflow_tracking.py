"""What a RunGuard leaves on an MLflow run: a support bot stuck in a loop, stopped, read back.

Run it with ``python examples/mlflow_tracking.py``. It needs ``mlflow`` and
``openai`` and no API key: the model is runguard's FakeProvider, stuck asking
for the same order lookup. The transcript (``mlflow.log_text``) and tool
outputs (``guard.log_tool_output``) are held and written as one artifact at
exit (``consolidate_artifacts=True``). The tracking store is a temporary sqlite file.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from runguard import RunGuard
from runguard.integrations.mlflow import drain
from runguard.testing import FakeProvider, Reply

# --- illustrative: a scripted model that keeps asking for the same tool ---------------------------
fake = FakeProvider(default=Reply(tool_calls=(("lookup_order", {"order_id": "ORD-7"}),)))
client = fake.openai()
# --------------------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}


def lookup_order(order_id: str) -> dict[str, str]:
    return {"order_id": order_id, "status": "in transit", "carrier": "DHL"}


def run_agent(guard: RunGuard, question: str) -> str:
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    for step in range(1, 50):
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, tools=[TOOL], max_tokens=300
        )
        message = reply.choices[0].message
        if not message.tool_calls:
            return message.content or ""
        messages.append(message.model_dump(exclude_none=True))
        for call in message.tool_calls:
            output = lookup_order(**json.loads(call.function.arguments))
            guard.log_tool_output(step, call.function.name, output)  # held, not uploaded
            print(f"  step {step}: {call.function.name} -> {output['status']}")
            messages.append(
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps(output)}
            )
        mlflow.log_text(json.dumps(messages), f"transcript/step-{step}.json")  # held too
    return "gave up"


def artifact_paths(
    tracking: mlflow.MlflowClient, run_id: str, under: str | None = None
) -> list[str]:
    found = []
    for item in tracking.list_artifacts(run_id, under):
        found += artifact_paths(tracking, run_id, item.path) if item.is_dir else [item.path]
    return found


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        artifacts = Path(tmp, "artifacts").as_uri()
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("support", artifacts))
        policy = Path(tmp, "refund-policy.md")
        policy.write_text("Refund late orders in full.\n")

        with mlflow.start_run() as run:
            guard = RunGuard(
                max_calls=6,
                name="support-bot",
                max_artifact_writes=20,  # files uploaded inside the guard, held ones not included
                consolidate_artifacts=True,
                raise_on_exit=False,  # end the block quietly; guard.trip says why
            )
            with guard:
                mlflow.log_artifact(str(policy))  # a real upload, counted
                print(run_agent(guard, "Where is order ORD-7?"))
        if guard.trip:
            print(f"stopped by {guard.trip.guard}: {guard.trip.reason}")
        print(f"calls admitted: {guard.usage.calls}")
        # --- illustrative: only the fake can count what really left the process -------------------
        print(f"requests that reached the provider: {fake.wire_count}")
        # ------------------------------------------------------------------------------------------

        drain()  # RunGuard writes to MLflow in the background; wait before reading back
        tracking = mlflow.MlflowClient()
        logged = tracking.get_run(run.info.run_id).data
        for key, value in sorted({**logged.tags, **logged.metrics}.items()):
            if key.startswith("runguard.support-bot."):
                print(f"{key}: {value:g}" if isinstance(value, float) else f"{key}: {value}")
        for path in artifact_paths(tracking, run.info.run_id):
            print(f"artifact: {path}")
        uri = f"runs:/{run.info.run_id}/runguard/support-bot/artifacts.json"
        held = mlflow.artifacts.load_dict(uri)["entries"]
        for kind in ("tool_output", "text"):
            print(f"{kind} entries in artifacts.json: {sum(e['kind'] == kind for e in held)}")

        # RunGuard can also start (and end) a run of its own, named after the guard
        with RunGuard(max_calls=3, name="nightly-digest", mlflow_run="start") as digest:
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Digest"}]
            )
        drain()
        started = tracking.get_run(digest.mlflow_run)
        print(f"run RunGuard started: {started.info.run_name} ({started.info.status})")
        print(f"its calls metric: {started.data.metrics['runguard.nightly-digest.calls']:g}")
        print(f"requests that reached the provider, both guards: {fake.wire_count}")


if __name__ == "__main__":
    main()
