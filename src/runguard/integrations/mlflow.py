"""What a RunGuard leaves in MLflow: its trip and usage, and its spend by step, on the run.

Only when the user's process has imported ``mlflow`` (RunGuard never imports
it otherwise): the run active when the guard was entered — captured then,
because MLflow's active run belongs to the thread that started it — or the
run id given as ``mlflow_run``. RunGuard starts a run only when asked
(``mlflow_run="start"``), and never uses MLflow's fluent ``log_*``
functions (they start runs implicitly).

Installs without a tracking client (``mlflow-tracing``) get trace marking
only; what exists is detected, never assumed from a version.

At exit, one batched write (tags and metrics) and one JSON artifact (the
spend by step, role and model) are made by a background thread, so a slow or
unreachable tracking server never delays the agent; a failure is one
warning. Writes per guard are constant: a run of 10,000 calls makes as many
as a run of one.
"""

from __future__ import annotations

import functools
import json
import sys
import threading
import time
import warnings
from collections import OrderedDict
from typing import Any

from .._background import Background
from .._records import Trip, Usage
from .mlflow_artifacts import internal

#: seconds the interpreter waits at exit for writes still queued
EXIT_WAIT = 5.0


def active_run_id() -> str | None:
    """The MLflow run active in this thread, if the user has imported mlflow."""
    active_run = getattr(sys.modules.get("mlflow"), "active_run", None)
    if active_run is None:
        return None
    try:
        run = active_run()
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
    current_span = getattr(mlflow, "get_current_active_span", None)
    if current_span is None:
        return  # an install without tracing
    try:
        span = current_span()
        if span is None:
            return
        span.set_attributes(attributes)
        event = getattr(getattr(mlflow, "entities", None), "SpanEvent", None)
        if event is not None:
            span.add_event(event("runguard.trip", attributes=attributes))
        update_trace = getattr(mlflow, "update_current_trace", None)
        if update_trace is not None:
            update_trace(tags={"runguard.tripped": "true", "runguard.trip_guard": trip.guard})
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
        f"{key}artifact_writes": usage.artifact_writes,
        f"{key}artifact_bytes": usage.artifact_bytes,
    }
    tags = {f"{key}tripped": "true" if trip is not None else "false"}
    if trip is not None:
        tags[f"{key}trip_guard"] = trip.guard
        tags[f"{key}trip_reason"] = trip.reason[:5000]
    return metrics, tags


class StartedRun:
    """The run RunGuard creates for ``mlflow_run="start"``, off the agent's path.

    ``id`` is None until the background writer has created it (and stays
    None if that failed, which was reported as a warning).
    """

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.id: str | None = None
        self.created = threading.Event()

    def __repr__(self) -> str:
        return f"<StartedRun {self.id or 'pending'}>"


#: a run id, or a run RunGuard is starting
Target = str | StartedRun


def start_run(name: str | None) -> StartedRun:
    """Queue the creation of a run in the current experiment; returns at once.

    Creating it in the background keeps a slow tracking server (and the
    import of mlflow, if the user had not imported it) off the agent's path.
    """
    run = StartedRun(name)
    _writer.submit(functools.partial(_create, run))
    return run


def _create(run: StartedRun) -> None:
    try:
        import mlflow
        from mlflow import MlflowClient

        # the experiment the user set (mlflow.set_experiment), else the default one
        experiment = mlflow.tracking.fluent._get_experiment_id() or "0"
        created = MlflowClient().create_run(
            experiment, run_name=run.name, tags={"runguard.started": "true"}
        )
        run.id = created.info.run_id
    except Exception as exc:
        _warn(f"could not start an MLflow run ({exc!r}); the guard's usage stays on the RunGuard")
    finally:
        run.created.set()


#: where held artifacts go: None for the guard's own run, else the run they were logged to
Held = tuple[Target | None, dict[str, Any]]


def log_exit(
    target: Target | None,
    name: str | None,
    usage: Usage,
    trip: Trip | None,
    ledger: dict[str, Any],
    held: list[Held] | tuple[Held, ...] = (),
    *,
    extra_metrics: dict[str, float] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> None:
    """Queue everything a guard writes at exit; returns at once.

    Held artifacts first (one JSON artifact per run), then the batch of tags
    and metrics and the ledger, and last, for a run RunGuard started, its end.
    ``extra_metrics`` and ``extra_tags`` are logged under the guard's prefix.
    """
    metrics, tags = summary(name, usage, trip)
    key = prefix(name)
    metrics |= {key + k: v for k, v in (extra_metrics or {}).items()}
    tags |= {key + k: v for k, v in (extra_tags or {}).items()}
    _writer.submit(functools.partial(_write, target, name, metrics, tags, ledger, held, trip))


def _write(
    target: Target | None,
    name: str | None,
    metrics: dict[str, float],
    tags: dict[str, str],
    ledger: dict[str, Any],
    held: list[Held] | tuple[Held, ...],
    trip: Trip | None,
) -> None:
    mlflow = sys.modules.get("mlflow")
    if mlflow is None or not hasattr(mlflow, "MlflowClient"):
        _warn_once(
            "this MLflow install has no tracking client (mlflow-tracing); "
            "RunGuard marks traces but cannot log to runs"
        )
        return
    run_id = _resolved(target)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for where, entry in held:
        held_in = run_id if where is None else _resolved(where)
        if held_in is not None:
            by_run.setdefault(held_in, []).append(entry)
    for held_in, entries in by_run.items():
        _write_held(held_in, name, entries)
    if run_id is None:
        return  # no run, or it could not be started (that was reported)
    try:
        from mlflow.entities import Metric, RunTag

        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
            tags=[RunTag(key, value) for key, value in tags.items()],
        )
        with internal():
            client.log_dict(run_id, ledger, _unclaimed(run_id, f"{_folder(name)}/ledger.json"))
    except Exception as exc:  # a tracking failure must never reach the agent
        _warn(
            f"could not log to MLflow run {run_id} ({exc!r}); "
            f"the guard's usage and trip are still on the RunGuard"
        )
    finally:
        if isinstance(target, StartedRun):
            _end(run_id, trip)


def _write_held(run_id: str, name: str | None, entries: list[dict[str, Any]]) -> None:
    payload = {"guard": name, "entries": entries}
    try:
        with internal():
            sys.modules["mlflow"].MlflowClient().log_text(
                run_id,
                json.dumps(payload, indent=1, default=str),
                _unclaimed(run_id, f"{_folder(name)}/artifacts.json"),
            )
    except Exception as exc:
        _warn(
            f"could not write {len(entries)} held artifacts to MLflow run "
            f"{run_id} ({exc!r}); they are still in RunGuard.artifacts"
        )


def _end(run_id: str, trip: Trip | None) -> None:
    try:
        sys.modules["mlflow"].MlflowClient().set_terminated(
            run_id, "FINISHED" if trip is None else "FAILED"
        )
    except Exception as exc:
        _warn(f"could not end the MLflow run {run_id} RunGuard started ({exc!r})")


def _resolved(target: Target | None) -> str | None:
    return target.id if isinstance(target, StartedRun) else target


def _folder(name: str | None) -> str:
    return f"runguard/{_safe(name)}" if name else "runguard"


#: (run id, path) -> how many guards of this process wrote it, the most recently written
#: last; used by the writer thread only
_claimed: OrderedDict[tuple[str, str], int] = OrderedDict()
#: (run, path) pairs remembered. A server that starts a run per request would otherwise
#: keep one entry per request for as long as it lives.
CLAIMS_KEPT = 4096


def _unclaimed(run_id: str, path: str) -> str:
    """``path``, or ``<stem>.<n>.json`` when another guard (unnamed, or of the same name) has it.

    Two guards writing to one run never overwrite each other's files, unless the
    process wrote :data:`CLAIMS_KEPT` other such files in between.
    """
    key = (run_id, path)
    seen = _claimed.get(key, 0)
    _claimed[key] = seen + 1
    _claimed.move_to_end(key)
    while len(_claimed) > CLAIMS_KEPT:
        _claimed.popitem(last=False)
    if not seen:
        return path
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}.{seen + 1}{dot}{suffix}"


def _warn(message: str) -> None:
    warnings.warn(f"runguard: {message}", RuntimeWarning, stacklevel=1)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _warn(message)


_writer = Background("runguard-mlflow", exit_wait=EXIT_WAIT)


def drain(timeout: float = EXIT_WAIT) -> bool:
    """Wait until queued MLflow writes are done (for tests, or before reading the run)."""
    return _writer.drain(timeout)
