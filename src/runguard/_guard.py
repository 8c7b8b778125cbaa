"""RunGuard and @guarded: lifecycle, nesting and scope of a set of ceilings."""

from __future__ import annotations

import builtins
import contextvars
import functools
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast, overload

from typing_extensions import ParamSpec, Self

from ._call import settle_deferred
from ._checks import positive
from ._errors import GuardTripped
from ._ledger import LEDGER, Account, next_serial, raise_trip
from ._records import Trip, Usage
from ._scope import active_accounts, context_accounts
from .alerts import OnAlert, check_on_alert, check_thresholds
from .budgets import Budget
from .guards import (
    ArtifactCeiling,
    Ceiling,
    Guard,
    IdenticalRequests,
    InputTokensPerCall,
    LlmSeconds,
    RateLimits,
    RepeatedToolCalls,
    WallSeconds,
)
from .guards.loops import DEFAULT_LOOP_WINDOW
from .pricing import Price, normalize_prices
from .steps import Breakdown, step

if TYPE_CHECKING:
    from .integrations.mlflow import StartedRun

#: seconds ``RunGuard.mlflow_run`` waits for a run RunGuard is starting
EXIT_WAIT = 5.0
#: seconds an exiting guard waits for settlements the garbage collector deferred
SETTLE_WAIT = 1.0

P = ParamSpec("P")
R = TypeVar("R")

Scope = Literal["context", "process"]

# keyword -> (metric, whether it counts in whole units)
_CEILINGS: dict[str, tuple[str, bool]] = {
    "max_calls": ("calls", True),
    "max_input_tokens": ("input_tokens", True),
    "max_output_tokens": ("output_tokens", True),
    "max_total_tokens": ("total_tokens", True),
    "max_cost_usd": ("cost_usd", False),
}


def _keyword_guards(limits: Mapping[str, Any], loop_window: object) -> list[Guard]:
    """The guards the keyword arguments ask for, in a fixed order."""
    built: list[Guard] = [
        Ceiling(field, _CEILINGS[field][0], positive(field, value, _CEILINGS[field][1]))
        for field, value in limits.items()
        if field in _CEILINGS and value is not None
    ]

    def given(field: str, whole: bool) -> Any:
        value = limits[field]
        return None if value is None else positive(field, value, whole)

    if (limit := given("max_input_tokens_per_call", True)) is not None:
        built.append(InputTokensPerCall(limit))
    if (limit := given("max_consecutive_429s", True)) is not None:
        built.append(RateLimits(limit, consecutive=True))
    if (limit := given("max_total_429s", True)) is not None:
        built.append(RateLimits(limit, consecutive=False))
    if (seconds := given("max_llm_seconds", False)) is not None:
        built.append(LlmSeconds(seconds))
    if (seconds := given("max_wall_seconds", False)) is not None:
        built.append(WallSeconds(seconds))
    if (limit := given("max_artifact_writes", True)) is not None:
        built.append(ArtifactCeiling("artifact_writes", int(limit)))
    if (limit := given("max_artifact_bytes", True)) is not None:
        built.append(ArtifactCeiling("artifact_bytes", int(limit)))
    window = (
        DEFAULT_LOOP_WINDOW if loop_window is None else positive("loop_window", loop_window, True)
    )
    for field, kind in (
        ("max_repeated_tool_calls", RepeatedToolCalls),
        ("max_identical_requests", IdenticalRequests),
    ):
        if (limit := given(field, True)) is not None:
            if window < limit:
                raise ValueError(
                    f"loop_window ({window}) must be at least {field} ({limit}), "
                    f"or the guard could never trip"
                )
            built.append(kind(limit, int(window)))
    return built


def _check_guard(guard: object) -> Guard:
    if isinstance(guard, type):
        # a class with the protocol's attributes passes the check below, then fails at
        # the first call
        raise TypeError(
            f"guards must hold guard objects; got the class {guard.__name__}, "
            f"pass an instance ({guard.__name__}(...))"
        )
    if not isinstance(guard, Guard):
        raise TypeError(
            f"guards must implement runguard.guards.Guard (name, needs_price, admit, "
            f"settled); got {type(guard).__name__}"
        )
    return guard


class RunGuard:
    """Ceilings on what the LLM calls made inside it may spend.

    Every call the ``openai`` and ``anthropic`` SDKs make inside the guard is
    admitted before it is sent (its worst case reserved under one lock in
    this guard and every enclosing one) and charged with its real usage when
    it returns. The first ceiling that would be crossed trips the guard: the
    call is refused with a :class:`GuardTripped` subclass, nothing is sent,
    and every later call inside the guard is refused the same way.

    Args:
        max_calls: LLM calls admitted (failed calls count; refused ones do not).
        max_input_tokens: input tokens, cache reads and writes included.
        max_output_tokens: output tokens, reasoning tokens included.
        max_total_tokens: input plus output tokens.
        max_cost_usd: dollars, priced from genai-prices (or ``prices``).
        max_input_tokens_per_call: refuse any single call whose estimated
            input is larger (:class:`ContextOverflow`).
        max_consecutive_429s: trip on this many HTTP attempts in a row
            answered 429, the SDKs' own retries included (:class:`RateLimitStorm`).
            With either 429 keyword, an answer saying a spending budget or
            quota is exhausted trips at once (:class:`UpstreamBudgetExceeded`).
        max_total_429s: the same, counting every 429 of the guard.
        max_llm_seconds: seconds spent inside LLM calls (a monotonic clock
            around the SDK call only) (:class:`LatencyBudgetExceeded`).
        max_wall_seconds: seconds since the guard was entered.
        max_repeated_tool_calls: trip when the model asks for the same tool
            call (name and arguments) this many times within ``loop_window``
            calls (:class:`LoopDetected`).
        max_identical_requests: allow this many identical requests (model,
            messages, tools) within ``loop_window`` calls; refuse the next.
        loop_window: calls the two loop guards look back over (default 20).
        guards: extra guards implementing :class:`runguard.guards.Guard`.
        budgets: shared :class:`Budget` s (per minute ... month, in a store)
            that must also admit every call, and are charged for it.
        alert_at: fractions of each keyword ceiling (calls, tokens, dollars)
            to warn at, once each (e.g. ``0.8`` or ``[0.5, 0.9]``).
        on_alert: where warnings go: a callable taking an
            :class:`~runguard.alerts.Alert`, or a webhook URL (JSON POST, off
            the agent's path); by default a ``logging`` warning.
        prices: per-model overrides: a :class:`Price` or the name of a known
            model to price it as.
        name: shown in messages, trips and reports.
        scope: ``"context"`` (default) covers the thread or asyncio task that
            enters the guard and the tasks it spawns; ``"process"`` covers
            every thread of the process.
        raise_on_exit: when the guard tripped, leaving the ``with`` block
            raises the trip even if the agent swallowed the exception. Pass
            False to end the block quietly and read :attr:`trip`.
        max_artifact_writes: artifact files MLflow may write on the agent's
            behalf inside the guard (``log_artifact``, ``log_text``,
            ``log_image`` ... and the ``MlflowClient`` methods); the write
            that would cross it raises :class:`ArtifactBudgetExceeded`.
        max_artifact_bytes: the same, in bytes written.
        consolidate_artifacts: hold small ``log_text`` / ``log_dict``
            artifacts (up to 256 KiB each) and write them as one JSON
            artifact when the guard exits, tripped or not.
        mlflow: False turns the MLflow integration off.
        mlflow_run: the MLflow run to log to at exit: a run id, or
            ``"start"`` to create one (named after the guard, ended at exit).
            By default, the run active when the guard is entered, if any.
    """

    def __init__(
        self,
        *,
        max_calls: int | None = None,
        max_input_tokens: int | None = None,
        max_output_tokens: int | None = None,
        max_total_tokens: int | None = None,
        max_cost_usd: float | None = None,
        max_input_tokens_per_call: int | None = None,
        max_consecutive_429s: int | None = None,
        max_total_429s: int | None = None,
        max_llm_seconds: float | None = None,
        max_wall_seconds: float | None = None,
        max_repeated_tool_calls: int | None = None,
        max_identical_requests: int | None = None,
        loop_window: int | None = None,
        max_artifact_writes: int | None = None,
        max_artifact_bytes: int | None = None,
        consolidate_artifacts: bool = False,
        guards: Iterable[Guard] = (),
        budgets: Iterable[Budget] = (),
        alert_at: float | Sequence[float] | None = None,
        on_alert: OnAlert = None,
        prices: Mapping[str, Price | str] | None = None,
        name: str | None = None,
        scope: Scope = "context",
        raise_on_exit: bool = True,
        mlflow: bool = True,
        mlflow_run: str | Literal["start"] | None = None,
    ) -> None:
        built = _keyword_guards(
            {
                "max_calls": max_calls,
                "max_input_tokens": max_input_tokens,
                "max_output_tokens": max_output_tokens,
                "max_total_tokens": max_total_tokens,
                "max_cost_usd": max_cost_usd,
                "max_input_tokens_per_call": max_input_tokens_per_call,
                "max_consecutive_429s": max_consecutive_429s,
                "max_total_429s": max_total_429s,
                "max_llm_seconds": max_llm_seconds,
                "max_wall_seconds": max_wall_seconds,
                "max_repeated_tool_calls": max_repeated_tool_calls,
                "max_identical_requests": max_identical_requests,
                "max_artifact_writes": max_artifact_writes,
                "max_artifact_bytes": max_artifact_bytes,
            },
            loop_window,
        )
        if isinstance(guards, (str, bytes)) or not isinstance(guards, Iterable):
            raise TypeError("guards must be an iterable of guard objects")
        built.extend(_check_guard(g) for g in guards)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if scope not in ("context", "process"):
            raise ValueError(f"scope must be 'context' or 'process', got {scope!r}")
        if not isinstance(raise_on_exit, bool):
            raise TypeError(f"raise_on_exit must be a bool, got {type(raise_on_exit).__name__}")
        if not isinstance(mlflow, bool):
            raise TypeError(f"mlflow must be a bool, got {type(mlflow).__name__}")
        if mlflow_run is not None and (not isinstance(mlflow_run, str) or not mlflow_run):
            raise TypeError(f"mlflow_run must be a run id (str) or 'start', got {mlflow_run!r}")
        if not isinstance(consolidate_artifacts, bool):
            raise TypeError(
                f"consolidate_artifacts must be a bool, got {type(consolidate_artifacts).__name__}"
            )
        artifact_options = [
            field
            for field, value in (
                ("max_artifact_writes", max_artifact_writes),
                ("max_artifact_bytes", max_artifact_bytes),
                ("consolidate_artifacts", consolidate_artifacts),
            )
            if value not in (None, False)
        ]
        if artifact_options and not mlflow:
            raise ValueError(
                f"{artifact_options[0]} acts on MLflow's artifact writes, but mlflow=False "
                f"turns the MLflow integration off"
            )
        if mlflow_run == "start" and importlib.util.find_spec("mlflow") is None:
            raise ValueError(
                "mlflow_run='start' needs MLflow installed: pip install 'agent-runguard[mlflow]'"
            )
        self.mlflow = mlflow
        self._mlflow_run: str | StartedRun | None = mlflow_run
        self.name = name
        self.scope: Scope = scope
        self.raise_on_exit = raise_on_exit
        if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Iterable):
            raise TypeError("budgets must be an iterable of runguard.Budget")
        shared: tuple[Budget, ...] = ()
        for budget in budgets:
            if not isinstance(budget, Budget):
                raise TypeError(f"budgets must hold runguard.Budget, got {type(budget).__name__}")
            if all(budget is not seen for seen in shared):  # listed twice: charged once
                shared += (budget,)
        thresholds = check_thresholds(alert_at)
        if thresholds and not any(isinstance(g, Ceiling) for g in built):
            raise ValueError(
                "alert_at warns before the keyword ceilings (max_calls, max_*_tokens, "
                "max_cost_usd) and none is set; for budgets, give Budget(alert_at=...)"
            )
        self._account = Account(
            name,
            built,
            normalize_prices(prices),
            shared,
            thresholds,
            check_on_alert(on_alert),
        )
        self._account.owner = self
        self._account.consolidates = consolidate_artifacts
        self._state: Literal["new", "active", "done"] = "new"

    # -- what the guard has seen -------------------------------------------------

    @property
    def mlflow_run(self) -> str | None:
        """The id of the MLflow run the guard logs to at exit, if any.

        The run given as ``mlflow_run``, or the one active when the guard was
        entered. With ``mlflow_run="start"``, the run RunGuard created: it is
        created off the agent's path, so reading this waits (up to 5 s) until
        it exists; None if it could not be created (that was a warning).
        """
        run = self._mlflow_run
        if isinstance(run, str):
            return None if run == "start" else run
        if run is None:
            return None
        run.created.wait(EXIT_WAIT)
        return run.id

    @property
    def guards(self) -> tuple[Guard, ...]:
        """The guards this RunGuard enforces, keyword ceilings first."""
        return self._account.guards

    @property
    def usage(self) -> Usage:
        """What the calls inside this guard have spent so far (a frozen snapshot)."""
        return LEDGER.snapshot(self._account)

    @property
    def trip(self) -> Trip | None:
        """The trip that latched this guard, or None while it is closed."""
        return self._account.trip

    @property
    def tripped(self) -> bool:
        return self._account.trip is not None

    @property
    def budgets(self) -> tuple[Budget, ...]:
        return self._account.budgets

    @property
    def ledger(self) -> Breakdown:
        """What the calls inside spent by step, role and model (a snapshot)."""
        return LEDGER.breakdown(self._account)

    def report(self) -> str:
        """A readable table of :attr:`ledger`, headed by the guard's name and totals."""
        usage = self.usage
        title = f"RunGuard {self.name!r}" if self.name else "RunGuard"
        title += f": {usage.calls:,} calls, ${usage.cost_usd:.4f}"
        return self.ledger.report(title)

    def step(self, name: str, role: str | None = None) -> step:
        """Attribute the calls made inside the ``with`` block to a step (and a role).

        The same as :func:`runguard.step`: the label covers every guard the
        calls are charged to.
        """
        return step(name, role)

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError(
                "a RunGuard can be entered once; create a new one (or use @guarded, "
                "which makes a fresh one per call)"
            )
        from .providers import instrument

        instrument()
        self._state = "active"
        self._account.serial = next_serial()
        self._account.entered_at = monotonic()
        if self.mlflow:
            self._enter_mlflow()
        if self.scope == "process":
            LEDGER.attach(self._account)
        else:
            context_accounts.set((self._account, *context_accounts.get()))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self._leave()
        settle_deferred(SETTLE_WAIT)
        trip = self._account.trip
        if self.mlflow:
            self._exit_mlflow(trip)
        if trip is None:
            return False
        if _only(trip, exc):
            # Our own trip is propagating (alone, or as every exception of a task
            # group's): end quietly if asked, else let it go.
            return not self.raise_on_exit
        if self.raise_on_exit and exc is None:
            # The agent swallowed the refusal (or usage overshot after the
            # last call): make the trip visible where the block ends.
            raise_trip(self._account, LEDGER)
        return False

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        return self.__exit__(exc_type, exc, tb)

    def _enter_mlflow(self) -> None:
        from .integrations.mlflow_artifacts import watch

        watch()  # artifact writes are counted from now on, whenever mlflow is imported
        if self._mlflow_run == "start":
            from .integrations.mlflow import start_run

            self._mlflow_run = start_run(self.name)
        elif self._mlflow_run is None and "mlflow" in sys.modules:
            from .integrations.mlflow import active_run_id

            self._mlflow_run = active_run_id()

    def _exit_mlflow(self, trip: Trip | None) -> None:
        """Queue the exit write and the held artifacts; never raises, never waits."""
        run = self._mlflow_run
        held = self._account.artifacts
        if run is None:
            orphans = [entry for where, entry in held if where is None]
            if orphans:
                warnings.warn(
                    f"runguard: {len(orphans)} held artifacts have no MLflow run to go "
                    f"to (no run was active when the guard was entered); they are in "
                    f"RunGuard.artifacts",
                    RuntimeWarning,
                    stacklevel=3,
                )
            held = [(where, entry) for where, entry in held if where is not None]
            if not held:
                return
        try:
            from .integrations.mlflow import log_exit

            log_exit(
                run, self.name, self.usage, trip, self.ledger.to_dict(), cast("list[Any]", held)
            )
        except Exception as exc:  # never let tracking break the agent
            warnings.warn(
                f"runguard: could not queue the MLflow write ({exc!r})",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def artifacts(self) -> tuple[dict[str, Any], ...]:
        """The entries held for the consolidated artifact, in order (``consolidate_artifacts``)."""
        return tuple(entry for _run, entry in self._account.artifacts)

    def log_tool_output(self, step: str | int, tool: str, output: Any) -> None:
        """Hold a tool's output for the guard's consolidated artifact, instead of one upload each.

        Written at exit, with everything else held, as one JSON artifact
        (``runguard/artifacts.json``, or ``runguard/<name>/artifacts.json``)
        on the guard's MLflow run, in call order with ``step`` and ``tool``.
        ``output`` is a string or anything JSON can hold (others are written
        with ``str``).
        """
        if self._state == "done":
            raise RuntimeError("the RunGuard has exited; log tool outputs inside its block")
        if not isinstance(tool, str):
            raise TypeError(f"tool must be a str, got {type(tool).__name__}")
        from .integrations.mlflow_artifacts import frozen_output, hold

        hold(self._account, None, "tool_output", frozen_output(output), step=step, tool=tool)

    def _leave(self) -> None:
        if self._state != "active":
            return
        self._state = "done"
        if self.scope == "process":
            LEDGER.detach(self._account)
            return
        # Only this guard leaves: guards exited out of order (an outer one first, or
        # guards opened in generators that are closed in another order) must neither
        # take a still-open guard with them nor bring back one that has ended.
        context_accounts.set(tuple(a for a in context_accounts.get() if a is not self._account))

    def __repr__(self) -> str:
        state = "tripped" if self.tripped else self._state
        label = f" {self.name!r}" if self.name else ""
        return f"<RunGuard{label} {state} guards={[g.name for g in self.guards]}>"


def _only(trip: Trip, exc: BaseException | None) -> bool:
    """Whether ``exc`` is ``trip``'s exception, or a group of nothing else."""
    if isinstance(exc, GuardTripped):
        return exc.trip is trip
    if not isinstance(exc, _GROUP):
        return False
    inner: tuple[BaseException, ...] = getattr(exc, "exceptions", ())
    return bool(inner) and all(_only(trip, e) for e in inner)


#: exception groups (Python 3.11+; before, an empty tuple, which nothing is an instance of)
_GROUP: Any = getattr(builtins, "BaseExceptionGroup", ())


def current_guard() -> RunGuard | None:
    """The innermost RunGuard covering the caller, or None."""
    accounts = active_accounts()
    if not accounts:
        return None
    owner = accounts[0].owner
    return owner if isinstance(owner, RunGuard) else None


@overload
def guarded(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def guarded(fn: None = None, /, **settings: Any) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def guarded(fn: Callable[P, R] | None = None, /, **settings: Any) -> Any:
    """Run each call of the decorated function inside a fresh ``RunGuard(**settings)``.

    Works on sync and ``async def`` functions. The settings are validated
    once, when the function is decorated. Guard objects passed as ``guards=``
    are shared by every invocation (the built-in ones keep no state of their
    own; what they count lives in each invocation's RunGuard).
    """
    for key in ("guards", "budgets"):
        if isinstance(settings.get(key), Iterator):
            # a generator would be used up by the first RunGuard
            settings[key] = tuple(settings[key])
    RunGuard(**settings)  # invalid settings fail at decoration time, naming the field

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            # Its body runs as the caller iterates, after the call has returned: a
            # guard around the call would cover none of it.
            raise TypeError(
                f"@guarded cannot guard the generator function {func.__qualname__}: its "
                "body runs while the caller iterates, after the call has returned. Guard "
                "the code that iterates it instead, or a function that does not yield"
            )
        # an object's async __call__ counts too
        if inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__):

            @functools.wraps(func)
            async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                with RunGuard(**settings):
                    return await cast(Awaitable[Any], func(*args, **kwargs))
                return None  # a trip ended quietly (raise_on_exit=False)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with RunGuard(**settings):
                return func(*args, **kwargs)
            return cast(R, None)  # a trip ended quietly (raise_on_exit=False)

        return run

    if fn is not None:
        return decorate(fn)
    return decorate


def propagate(fn: Callable[P, R]) -> Callable[P, R]:
    """Bind ``fn`` to the caller's context-scoped guards, for use in other threads.

    Threads do not inherit context variables, so a context-scoped RunGuard
    does not cover work submitted to a thread pool. Wrap the function where
    the guard is active: ``pool.submit(runguard.propagate(work), item)``.
    Each call runs in its own copy of the captured context, so one wrapped
    function can run in many threads at once.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

    return run
