"""A mark for guard methods that let every call go, so the ledger need not call them.

``admit`` and ``settled`` run for every call under the ledger's lock; a
guard that judges only attempts, artifacts or answers defines the other
one as a no-op, and skipping those calls keeps the hot path short.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def inert(method: F) -> F:
    """Mark ``method`` (an ``admit`` or ``settled`` that always returns None)."""
    method.runguard_inert = True  # type: ignore[attr-defined]
    return method


def judging(guards: Sequence[Any], method: str) -> tuple[Any, ...]:
    """The guards whose ``method`` is not marked inert, in order."""
    return tuple(g for g in guards if not getattr(getattr(g, method), "runguard_inert", False))
