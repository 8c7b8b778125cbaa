"""Attribution: which step of the agent, in which role, spent what, on which model.

``with runguard.step("synthesis", role="writer"):`` labels every LLM call made
inside (in this thread or task and the tasks it spawns). Steps nest: an
inner step's calls are attributed to ``"outer/inner"``; an inner step without
a role keeps the outer one. Each RunGuard keeps aggregates per (step, role,
model), never a list of calls, so its memory does not grow with the run.
"""

from __future__ import annotations

from contextvars import ContextVar
from types import TracebackType
from typing import Any, NamedTuple

from ._records import Usage

NO_STEP = "(no step)"
NO_ROLE = "(no role)"


class _Frame(NamedTuple):
    path: str | None
    role: str | None
    outer: _Frame | None


# A chain of frames per context, so one step object can be entered again,
# nested, or by many tasks at once: leaving restores the frame it entered from.
_current: ContextVar[_Frame | None] = ContextVar("runguard_step", default=None)


def current_step() -> tuple[str | None, str | None]:
    """The (step path, role) that calls made now are attributed to."""
    frame = _current.get()
    return (None, None) if frame is None else (frame.path, frame.role)


class step:
    """Attribute the LLM calls made inside to a step (and, optionally, a role).

    The object holds no state of its own: it can be entered again, nested in
    itself, or shared by concurrent tasks and threads.
    """

    __slots__ = ("name", "role")

    def __init__(self, name: str, role: str | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"step name must be a non-empty str, got {name!r}")
        if role is not None and (not isinstance(role, str) or not role):
            raise TypeError(f"role must be a non-empty str or None, got {role!r}")
        self.name = name
        self.role = role

    def __enter__(self) -> step:
        outer = _current.get()
        if outer is None:
            _current.set(_Frame(self.name, self.role, None))
        else:
            path = f"{outer.path}/{self.name}"
            _current.set(_Frame(path, self.role or outer.role, outer))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        frame = _current.get()
        _current.set(None if frame is None else frame.outer)

    async def __aenter__(self) -> step:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def _plus(a: Usage, b: Usage) -> Usage:
    return Usage._make(x + y for x, y in zip(a, b, strict=True))


class Breakdown:
    """What a RunGuard's calls spent, by step, by role and by model (aggregates only)."""

    def __init__(self, rows: dict[tuple[str | None, str | None, str], Usage]) -> None:
        #: (step, role, model) -> Usage
        self.rows = rows

    def _by(self, index: int, empty: str) -> dict[str, Usage]:
        totals: dict[str, Usage] = {}
        for key, usage in self.rows.items():
            name = key[index] or empty
            totals[name] = _plus(totals[name], usage) if name in totals else usage
        return dict(sorted(totals.items(), key=lambda item: -item[1].cost_usd))

    @property
    def by_step(self) -> dict[str, Usage]:
        """Step path -> Usage, most expensive first (calls outside any step: ``(no step)``)."""
        return self._by(0, NO_STEP)

    @property
    def by_role(self) -> dict[str, Usage]:
        return self._by(1, NO_ROLE)

    @property
    def by_model(self) -> dict[str, Usage]:
        return self._by(2, "unknown")

    @property
    def most_expensive_step(self) -> tuple[str, Usage] | None:
        """The step that cost the most (by dollars, then tokens), or None before any call."""
        steps = self.by_step
        if not steps:
            return None
        return max(steps.items(), key=lambda item: (item[1].cost_usd, item[1].total_tokens))

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``{"by_step": {...}, "by_role": {...}, "by_model": {...}}``."""
        return {
            "by_step": {k: v._asdict() for k, v in self.by_step.items()},
            "by_role": {k: v._asdict() for k, v in self.by_role.items()},
            "by_model": {k: v._asdict() for k, v in self.by_model.items()},
        }

    def report(self, title: str = "RunGuard") -> str:
        """A readable table: one row per step, then per role and per model."""
        lines = [title, "=" * len(title)]
        for heading, table in (
            ("step", self.by_step),
            ("role", self.by_role),
            ("model", self.by_model),
        ):
            width = max([len(heading), *(len(name) for name in table)])
            lines.append("")
            lines.append(
                f"{heading:<{width}}  {'calls':>6}  {'input':>10}  {'output':>9}  "
                f"{'cost':>10}  {'LLM s':>7}"
            )
            lines.append("-" * (width + 52))
            for name, usage in table.items():
                cost = f"${usage.cost_usd:,.4f}"
                lines.append(
                    f"{name:<{width}}  {usage.calls:>6,}  {usage.input_tokens:>10,}  "
                    f"{usage.output_tokens:>9,}  {cost:>10}  {usage.llm_seconds:>7.2f}"
                )
        top = self.most_expensive_step
        if top is not None:
            lines.append("")
            lines.append(f"most expensive step: {top[0]} (${top[1].cost_usd:.4f})")
        return "\n".join(lines)
