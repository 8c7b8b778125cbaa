"""guarded_evaluate: an MLflow evaluation whose LLM fan-out is estimated, fitted and enforced.

An evaluation multiplies: rows times (agent calls + one call per LLM judge),
plus a validation call, times the harness's retries. Before the first call
:func:`estimate_eval_calls` works that out from the data and the scorers;
:func:`guarded_evaluate` then samples the data (with a fixed seed) down to
what fits ``max_llm_calls``, or refuses, and runs the evaluation inside a
process-scoped RunGuard (the harness runs rows and scorers in thread pools).

That RunGuard sees the agent's calls (openai/anthropic SDKs) and MLflow's
judge calls (which post their own HTTP requests; see
``runguard.providers.mlflow_judges``) alike, and refuses the call that
would cross ``max_llm_calls`` or ``max_cost_usd`` before it is sent. A
refused row keeps an error in MLflow's result; :class:`GuardedEvaluation`
says how many rows were fully scored.

Nothing here imports mlflow until a function is called.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ._checks import positive
from ._errors import BudgetExceeded
from ._guard import RunGuard
from ._records import Trip, Usage
from .pricing import Price

#: MLflow's defaults when its environment variables are unset (see docs/mlflow.md)
HARNESS_RETRIES = 3
JUDGE_HTTP_RETRIES = 10
SDK_RETRIES = 2

OnOverBudget = Literal["sample", "raise"]


@dataclass(frozen=True)
class EvalEstimate:
    """How many LLM calls an evaluation will make, before it makes any.

    ``llm_calls`` is the expected count: every row's agent calls, one call
    per LLM judge per row, and the harness's check before it starts
    (``mlflow.genai.evaluate`` runs the agent once more to validate its
    tracing; ``mlflow.models.evaluate`` runs each LLM metric once more on the
    first row). ``worst_llm_calls`` adds every retry that the harness, the
    judges and the SDKs may make on rate-limit answers. ``fits`` is how many
    rows fit ``max_llm_calls`` (all of them when no ceiling was given).
    """

    rows: int
    #: ``"genai"`` (``mlflow.genai.evaluate``) or ``"legacy"`` (``mlflow.models.evaluate``)
    harness: str
    agent_calls_per_row: float
    #: LLM judge name -> calls it makes per row
    judges: Mapping[str, float]
    #: the harness's check before it starts: included in the calls below
    validation_calls: int
    agent_calls: int
    judge_calls: int
    llm_calls: int
    worst_llm_calls: int
    max_llm_calls: int | None = None
    fits: int = 0
    #: scorers that make no LLM call of their own (deterministic, or user code)
    other_scorers: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "judges", MappingProxyType(dict(self.judges)))

    def for_rows(self, rows: int) -> int:
        """Expected LLM calls for an evaluation of ``rows`` of these rows."""
        agent, judge, _ = _split(
            rows, self.harness, self.agent_calls_per_row, self.judges, self.validation_calls > 0
        )
        return agent + judge


@dataclass(frozen=True)
class GuardedEvaluation:
    """What :func:`guarded_evaluate` did: MLflow's result, and what RunGuard allowed.

    Attributes not defined here (``metrics``, ``run_id``, ``tables`` ...) are
    read from MLflow's result, so it can stand in for it.
    """

    result: Any
    estimate: EvalEstimate
    rows_total: int
    rows_kept: int
    #: rows whose agent answered and whose every scorer gave a value (None: MLflow
    #: returned no per-row table to read it from)
    rows_scored: int | None
    usage: Usage
    trip: Trip | None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.result, name)


def estimate_eval_calls(
    data: Any,
    scorers: Sequence[Any] = (),
    predict_fn: Callable[..., Any] | None = None,
    *,
    agent_calls_per_row: float = 1,
    judge_calls_per_row: Mapping[str, float] | None = None,
    max_llm_calls: int | None = None,
    model: Any = None,
    extra_metrics: Sequence[Any] = (),
) -> EvalEstimate:
    """The LLM calls an evaluation of ``data`` with ``scorers`` would make.

    Takes the arguments of ``mlflow.genai.evaluate`` (``data``, ``scorers``,
    ``predict_fn``) or of the legacy ``mlflow.models.evaluate`` (``model``,
    ``data``, ``extra_metrics``). ``agent_calls_per_row`` is how many LLM
    calls the agent makes per row; ``judge_calls_per_row`` overrides the
    calls a named judge makes per row (1 by default; a judge reading the
    trace may loop, a retrieval judge makes one per retrieved chunk).
    """
    if agent_calls_per_row != 0 or isinstance(agent_calls_per_row, bool):  # 0: outputs given
        positive("agent_calls_per_row", agent_calls_per_row, whole=False)
    if max_llm_calls is not None:
        positive("max_llm_calls", max_llm_calls, whole=True)
    harness = "legacy" if predict_fn is None and (model is not None or extra_metrics) else "genai"
    rows = _row_count(data)
    runs_agent = (predict_fn if harness == "genai" else model) is not None
    per_row = float(agent_calls_per_row) if runs_agent else 0.0
    judges: dict[str, float] = {}
    others: list[str] = []
    if judge_calls_per_row is not None and not isinstance(judge_calls_per_row, Mapping):
        raise TypeError(
            "judge_calls_per_row must map judge names to calls per row, "
            f"got {type(judge_calls_per_row).__name__}"
        )
    overrides = dict(judge_calls_per_row or {})
    for judge_name, calls in overrides.items():
        positive(f"judge_calls_per_row[{judge_name!r}]", calls, whole=False)
    for scorer in (*scorers, *extra_metrics):
        name = str(getattr(scorer, "name", type(scorer).__name__))
        if _is_llm_judge(scorer):
            judges[name] = judges.get(name, 0.0) + float(overrides.pop(name, 1.0))
        else:
            others.append(name)
    if overrides:
        raise ValueError(
            f"judge_calls_per_row names no LLM judge of this evaluation: {sorted(overrides)}"
        )
    if harness == "genai":
        validates = runs_agent and not _env_true("MLFLOW_GENAI_EVAL_SKIP_TRACE_VALIDATION")
        retries = 1 + _env_int("MLFLOW_GENAI_EVAL_MAX_RETRIES", HARNESS_RETRIES)
        judge_http = 1 + (0 if _has("litellm") else JUDGE_HTTP_RETRIES)
    else:
        validates = True  # MLflow tests every metric on the first row first
        retries = judge_http = 1  # the legacy harness and its judges retry nothing
    agent, judge, validation = _split(rows, harness, per_row, judges, validates)
    # every HTTP request that may reach a provider: the SDKs' and judges' own
    # retries and the harness's re-runs, on rate-limit answers only
    worst = agent * retries * (1 + SDK_RETRIES) + judge * retries * judge_http
    fits = rows
    if max_llm_calls is not None:
        fits = _rows_within(max_llm_calls, rows, harness, per_row, judges, validates)
    return EvalEstimate(
        rows=rows,
        harness=harness,
        agent_calls_per_row=per_row,
        judges=judges,
        validation_calls=validation,
        agent_calls=agent,
        judge_calls=judge,
        llm_calls=agent + judge,
        worst_llm_calls=worst,
        max_llm_calls=max_llm_calls,
        fits=fits,
        other_scorers=tuple(others),
    )


def guarded_evaluate(
    data: Any = None,
    scorers: Sequence[Any] | None = None,
    predict_fn: Callable[..., Any] | None = None,
    *,
    max_llm_calls: int | None = None,
    max_cost_usd: float | None = None,
    agent_calls_per_row: float = 1,
    judge_calls_per_row: Mapping[str, float] | None = None,
    on_over_budget: OnOverBudget = "sample",
    min_rows: int = 1,
    seed: int = 0,
    model: Any = None,
    extra_metrics: Sequence[Any] | None = None,
    name: str = "eval",
    prices: Mapping[str, Price | str] | None = None,
    **evaluate_kwargs: Any,
) -> GuardedEvaluation:
    """``mlflow.genai.evaluate`` (or legacy ``mlflow.models.evaluate``) inside a fitted budget.

    Give ``scorers`` (and ``predict_fn``) for the GenAI form, ``model`` and
    ``extra_metrics`` for the legacy one; other keywords go to MLflow.
    ``prices`` prices models RunGuard does not know (as on :class:`RunGuard`),
    such as a judge behind a gateway endpoint, when ``max_cost_usd`` is set.

    Over ``max_llm_calls`` by the estimate, ``on_over_budget="sample"``
    keeps a random sample of the rows (fixed ``seed``, original order) that
    fits, and ``"raise"`` refuses; fewer than ``min_rows`` rows fitting is
    refused either way. A refusal raises :class:`BudgetExceeded` before any
    call. During the evaluation ``max_llm_calls`` and ``max_cost_usd`` are
    enforced call by call, agent and judge calls alike. The estimate, the
    sample and the usage are logged on the evaluation's run.
    """
    legacy = model is not None or extra_metrics is not None
    if legacy and (scorers is not None or predict_fn is not None):
        raise TypeError(
            "give scorers/predict_fn (mlflow.genai.evaluate) or model/extra_metrics "
            "(mlflow.models.evaluate), not both"
        )
    if on_over_budget not in ("sample", "raise"):
        raise ValueError(f"on_over_budget must be 'sample' or 'raise', got {on_over_budget!r}")
    positive("min_rows", min_rows, whole=True)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    estimate = estimate_eval_calls(
        data,
        scorers or (),
        predict_fn,
        agent_calls_per_row=agent_calls_per_row,
        judge_calls_per_row=judge_calls_per_row,
        max_llm_calls=max_llm_calls,
        model=model,
        extra_metrics=extra_metrics or (),
    )
    guard = RunGuard(
        max_calls=max_llm_calls,
        max_cost_usd=max_cost_usd,
        prices=prices,
        name=name,
        scope="process",
        raise_on_exit=False,
        mlflow=False,  # the evaluation's own run gets the summary, below
    )
    kept = estimate.fits
    if kept < estimate.rows and (on_over_budget == "raise" or kept < min_rows):
        _refuse(estimate, min_rows, on_over_budget, name)
    sample = _sample(data, estimate.rows, kept, seed) if kept < estimate.rows else data

    import mlflow

    with guard:
        if legacy:
            result = mlflow.models.evaluate(  # type: ignore[no-untyped-call]
                model=model,
                data=sample,
                extra_metrics=list(extra_metrics or ()),
                **evaluate_kwargs,
            )
        else:
            result = mlflow.genai.evaluate(
                data=sample, scorers=list(scorers or ()), predict_fn=predict_fn, **evaluate_kwargs
            )
    evaluation = GuardedEvaluation(
        result=result,
        estimate=estimate,
        rows_total=estimate.rows,
        rows_kept=kept,
        rows_scored=_rows_scored(result, estimate.judges, legacy),
        usage=guard.usage,
        trip=guard.trip,
    )
    _log_summary(getattr(result, "run_id", None), name, evaluation, guard.ledger.to_dict())
    return evaluation


# -- the estimate ---------------------------------------------------------------------


def _split(
    rows: int, harness: str, per_row: float, judges: Mapping[str, float], validates: bool
) -> tuple[int, int, int]:
    """(agent calls, judge calls, of which the harness's check) for ``rows`` rows."""
    per_judge = sum(judges.values())
    check = 1 if validates and rows else 0
    if harness == "genai":  # the agent runs once more, on the first row
        return (
            math.ceil((rows + check) * per_row),
            math.ceil(rows * per_judge),
            check * math.ceil(per_row),
        )
    # legacy: each LLM metric runs once more, on the first row
    return (
        math.ceil(rows * per_row),
        math.ceil((rows + check) * per_judge),
        check * math.ceil(per_judge),
    )


def _rows_within(
    limit: int,
    rows: int,
    harness: str,
    per_row: float,
    judges: Mapping[str, float],
    validates: bool,
) -> int:
    """The most rows whose expected calls stay within ``limit``."""
    low, high = 0, rows
    while low < high:
        middle = (low + high + 1) // 2
        agent, judge, _ = _split(middle, harness, per_row, judges, validates)
        if agent + judge <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def _is_llm_judge(scorer: Any) -> bool:
    """Whether a scorer (or legacy metric) calls an LLM itself (MLflow's own rules, detected)."""
    if getattr(scorer, "genai_metric_args", None) is not None:
        return True  # a legacy LLM metric (make_genai_metric ...)
    kind = getattr(getattr(scorer, "kind", None), "value", None)
    if kind in ("instructions", "guidelines", "third_party"):
        return True
    if kind == "builtin":
        return "model" in getattr(type(scorer), "model_fields", {})
    return False


def _row_count(data: Any) -> int:
    if data is None:
        raise ValueError("data is required")
    to_df = getattr(data, "to_df", None)
    if callable(to_df):  # an MLflow EvaluationDataset
        data = to_df()
    try:
        return len(data)
    except TypeError:
        raise TypeError(
            f"cannot count the rows of {type(data).__name__}; pass a list, a DataFrame "
            f"or an EvaluationDataset"
        ) from None


def _sample(data: Any, rows: int, keep: int, seed: int) -> Any:
    """``keep`` rows of ``data`` picked with ``seed``, in their original order."""
    chosen = sorted(random.Random(seed).sample(range(rows), keep))
    to_df = getattr(data, "to_df", None)
    if callable(to_df):
        data = to_df()
    if hasattr(data, "iloc"):
        return data.iloc[chosen]
    if isinstance(data, Sequence):
        return [data[i] for i in chosen]
    raise TypeError(f"cannot sample {type(data).__name__}; pass a list or a DataFrame")


def _refuse(estimate: EvalEstimate, min_rows: int, on_over_budget: str, name: str) -> None:
    limit = estimate.max_llm_calls or 0
    reason = (
        f"the evaluation would make about {estimate.llm_calls:,} LLM calls "
        f"({estimate.rows:,} rows), over max_llm_calls={limit:,}; {estimate.fits:,} rows fit"
    )
    if on_over_budget == "sample":
        reason += f", fewer than min_rows={min_rows:,}"
    trip = Trip(
        guard="max_llm_calls",
        reason=reason + "; nothing was sent",
        limit=limit,
        observed=estimate.llm_calls,
        run=name,
        exception=BudgetExceeded,
        details={"rows": estimate.rows, "fits": estimate.fits},
    )
    raise BudgetExceeded(trip, Usage())


# -- what was scored -----------------------------------------------------------------


def _rows_scored(result: Any, judges: Mapping[str, float], legacy: bool) -> int | None:
    """Rows whose agent answered and whose every scorer gave a value; None if unreadable."""
    table = _results_table(result, legacy)
    if table is None:
        return None
    failed = table.index.isin([])  # all False
    for column in table.columns:
        name = str(column)
        if name.endswith("/error_message"):
            failed |= table[column].notna()
        elif legacy and name.endswith("/score") and name.split("/")[0] in judges:
            failed |= table[column].isna()
    if "state" in table.columns:
        failed |= table["state"].astype(str).str.upper().eq("ERROR")
    return int((~failed).sum())


def _results_table(result: Any, legacy: bool) -> Any:
    try:
        if legacy:
            return (getattr(result, "tables", None) or {}).get("eval_results_table")
        return getattr(result, "result_df", None)
    except Exception:  # a result without its table still returns
        return None


# -- reporting ------------------------------------------------------------------------


def _log_summary(
    run_id: str | None, name: str, evaluation: GuardedEvaluation, ledger: dict[str, Any]
) -> None:
    if not run_id:
        return
    from .integrations.mlflow import log_exit

    estimate = evaluation.estimate
    extra_metrics: dict[str, float] = {
        "estimated_llm_calls": estimate.llm_calls,
        "estimated_llm_calls_kept": estimate.for_rows(evaluation.rows_kept),
        "worst_llm_calls": estimate.worst_llm_calls,
        "rows_total": evaluation.rows_total,
        "rows_kept": evaluation.rows_kept,
    }
    if evaluation.rows_scored is not None:
        extra_metrics["rows_scored"] = evaluation.rows_scored
    extra_tags = {"sampled": "true" if evaluation.rows_kept < evaluation.rows_total else "false"}
    try:
        log_exit(
            run_id,
            name,
            evaluation.usage,
            evaluation.trip,
            ledger,
            extra_metrics=extra_metrics,
            extra_tags=extra_tags,
        )
    except Exception as exc:
        warnings.warn(
            f"runguard: could not queue the evaluation summary ({exc!r})",
            RuntimeWarning,
            stacklevel=3,
        )


# -- small checks ---------------------------------------------------------------------


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
