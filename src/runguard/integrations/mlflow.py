"""What a RunGuard leaves in MLflow: its trip and usage, and its spend by step, on the run.

Only when the user's process has imported ``mlflow`` (RunGuard never imports
it otherwise): the run active when the guard was entered — captured then,
because MLflow's active run belongs to the thread that started it — or the
run id given as ``mlflow_run``. RunGuard never starts a run and never uses
MLflow's fluent ``log_*`` functions (they start runs).

At exit, one batched write (tags and metrics) and one JSON artifact (the
spend by step, role and model) are made by a background thread, so a slow or
unreachable tracking server never delays the agent; a failure is one
warning. Writes per guard are constant: a run of 10,000 calls makes as many
as a run of one.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from typing import Any

from .._background import Background
from .._records import Trip, Usage

#: seconds the interpreter waits at exit for writes still queued
EXIT_WAIT = 5.0


def active_run_id() -> str | None:
    """The MLflow run active in this thread, if the user has imported mlflow."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return None
    try:
        run = mlflow.active_run()
    except Exception:
        return None
    return run.info.run_id if run is not None else None


def mark_trace(trip: Trip) -> None:
    """On the active MLflow trace, if any: a trip event on the current span, and trace tags.

    Tags make tripped traces searchable:
    ``mlflow.search_traces(filter_string="tags.`runguard.tripped` = 'true'")``.
    Never raises; it runs in the agent's thread but makes no network call
    (traces are exported by MLflow in the background).
    """
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    attributes: dict[str, Any] = {
        "runguard.trip_guard": trip.guard,
        "runguard.trip_reason": trip.reason,
        "runguard.trip_limit": float(trip.limit),
        "runguard.trip_observed": float(trip.observed),
        "runguard.run": trip.run or "",
    }
    try:
        span = mlflow.get_current_active_span()
        if span is None:
            return
        from mlflow import entities

        event: Any = entities.SpanEvent  # typed as abstract in some MLflow versions
        span.set_attributes(attributes)
        span.add_event(event("runguard.trip", attributes=attributes))
        mlflow.update_current_trace(
            tags={"runguard.tripped": "true", "runguard.trip_guard": trip.guard}
        )
    except Exception as exc:  # tracing must never break the agent
        warnings.warn(
            f"runguard: could not mark the MLflow trace ({exc!r})", RuntimeWarning, stacklevel=2
        )


def _safe(name: str) -> str:
    # MLflow keys allow letters, digits, "_-./ " only
    return "".join(c if c.isalnum() or c in "-_. " else "_" for c in name)


def prefix(name: str | None) -> str:
    """Key prefix: ``runguard.`` or, for a named guard, ``runguard.<name>.``.

    A named guard's keys do not collide with an enclosing guard's on the same run.
    """
    return f"runguard.{_safe(name)}." if name else "runguard."


def artifact_path(name: str | None) -> str:
    return f"runguard/{_safe(name)}/ledger.json" if name else "runguard/ledger.json"


def summary(
    name: str | None, usage: Usage, trip: Trip | None
) -> tuple[dict[str, float], dict[str, str]]:
    """The metrics and tags a guard logs at exit."""
    key = prefix(name)
    metrics = {
        f"{key}calls": usage.calls,
        f"{key}input_tokens": usage.input_tokens,
        f"{key}output_tokens": usage.output_tokens,
        f"{key}cached_tokens": usage.cache_read_tokens + usage.cache_write_tokens,
        f"{key}cost_usd": usage.cost_usd,
        f"{key}llm_seconds": usage.llm_seconds,
        f"{key}rate_limited_attempts": usage.rate_limited_attempts,
        f"{key}estimated_calls": usage.estimated_calls,
    }
    tags = {f"{key}tripped": "true" if trip is not None else "false"}
    if trip is not None:
        tags[f"{key}trip_guard"] = trip.guard
        tags[f"{key}trip_reason"] = trip.reason[:5000]
    return metrics, tags


def log_exit(
    run_id: str,
    name: str | None,
    usage: Usage,
    trip: Trip | None,
    ledger: dict[str, Any],
) -> None:
    """Queue the guard's exit write for ``run_id``; returns at once."""
    metrics, tags = summary(name, usage, trip)
    _writer.submit(functools.partial(_write, run_id, metrics, tags, artifact_path(name), ledger))


def _write(
    run_id: str,
    metrics: dict[str, float],
    tags: dict[str, str],
    artifact: str,
    ledger: dict[str, Any],
) -> None:
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag

        client = MlflowClient()
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        client.log_dict(run_id, ledger, artifact)
    except Exception as exc:  # a tracking failure must never reach the agent
        warnings.warn(
            f"runguard: could not log to MLflow run {run_id} ({exc!r}); "
            f"the guard's usage and trip are still on the RunGuard",
            RuntimeWarning,
            stacklevel=1,
        )


_writer = Background("runguard-mlflow", exit_wait=EXIT_WAIT)


def drain(timeout: float = EXIT_WAIT) -> bool:
    """Wait until queued MLflow writes are done (for tests, or before reading the run)."""
    return _writer.drain(timeout)
