"""``max_repeated_tool_calls`` and ``max_identical_requests``: an agent repeating itself.

Both look at a sliding window of the last ``loop_window`` calls of a
RunGuard, so their memory and their work per call stay bounded however long
the run is. Neither keys on the model: many calls to one model with
different content, a conversation that grows, or one tool called with
different arguments never trip them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

from .._errors import LoopDetected
from .._records import CallRequest, CallResult, ToolCall, Trip
from ._inert import inert

if TYPE_CHECKING:
    from .._ledger import Account

#: calls remembered by the loop guards when ``loop_window`` is not given
DEFAULT_LOOP_WINDOW = 20


class _Window:
    """How often each key appeared in the last ``size`` calls."""

    __slots__ = ("counts", "left", "recent")

    def __init__(self, size: int) -> None:
        self.recent: deque[tuple[Hashable, ...]] = deque(maxlen=size)
        self.counts: dict[Hashable, int] = {}
        #: the calls that slid out last, newest last: one comes back when a call is withdrawn
        self.left: deque[tuple[Hashable, ...]] = deque(maxlen=size)

    def push(self, keys: tuple[Hashable, ...]) -> None:
        """Count one call's ``keys``, which must be distinct (a key counts once per call)."""
        counts = self.counts
        recent = self.recent
        if len(recent) == recent.maxlen:
            oldest = recent[0]
            self.left.append(oldest)
            for old in oldest:
                left = counts[old] - 1
                if left:
                    counts[old] = left
                else:
                    del counts[old]
        recent.append(keys)
        for key in keys:
            counts[key] = counts.get(key, 0) + 1

    def withdraw(self, keys: tuple[Hashable, ...]) -> None:
        """Take back the latest call pushed with ``keys``, as if it had never been pushed."""
        if not _drop_latest(self.recent, keys):
            _drop_latest(self.left, keys)  # it had slid out already: the window is as it would be
            return
        # push's bookkeeping, which push keeps inline: it runs on every call
        counts = self.counts
        for key in keys:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
        if self.left:  # the call it pushed out slides back in
            back = self.left.pop()
            self.recent.appendleft(back)
            for key in back:
                counts[key] = counts.get(key, 0) + 1


def _drop_latest(calls: deque[tuple[Hashable, ...]], keys: tuple[Hashable, ...]) -> bool:
    """Remove the newest entry equal to ``keys``; whether there was one."""
    for i in range(len(calls) - 1, -1, -1):
        if calls[i] == keys:
            del calls[i]
            return True
    return False


def _window(guard: object, window: int, account: Account) -> _Window:
    """The guard's window in ``account``, made on first use.

    The guards look it up in ``account.state`` inline first: this runs on every call.
    """
    memory = account.state.get(guard)
    if memory is None:
        memory = account.state[guard] = _Window(window)
    return memory


class RepeatedToolCalls:
    """Trips when the model asks for the same tool call ``limit`` times within ``window`` calls.

    A tool call is the tool's name and its arguments, compared as JSON (key
    order and spacing do not matter). The call whose answer repeats the
    tool call for the ``limit``-th time has been paid for; the next call is
    refused, so the agent does not run the tool and ask again.
    """

    __slots__ = ("limit", "name", "needs_price", "needs_tool_calls", "window")

    def __init__(
        self, limit: int, window: int = DEFAULT_LOOP_WINDOW, name: str = "max_repeated_tool_calls"
    ) -> None:
        self.name = name
        self.limit = limit
        self.window = window
        self.needs_price = False
        self.needs_tool_calls = True

    @inert
    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        return None

    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        memory = account.state.get(self) or _window(self, self.window, account)
        calls = result.tool_calls
        # an answer asking twice for one tool call counts it once
        memory.push(calls if len(calls) < 2 else tuple(set(calls)))
        counts = memory.counts
        for tool_call in result.tool_calls:
            seen = counts[tool_call]
            if seen >= self.limit:
                return self._trip(tool_call, seen)
        return None

    def _trip(self, tool_call: ToolCall, seen: int) -> Trip:
        return Trip(
            guard=self.name,
            reason=(
                f"the model asked for the same tool call {tool_call} {seen} times within "
                f"the last {self.window} calls (limit {self.limit}); further calls are refused"
            ),
            limit=self.limit,
            observed=seen,
            exception=LoopDetected,
            details={"tool": tool_call.name, "arguments": tool_call.arguments},
        )

    def __repr__(self) -> str:
        return f"RepeatedToolCalls({self.limit!r}, window={self.window!r})"


class IdenticalRequests:
    """Allows at most ``limit`` identical requests within ``window`` calls; refuses the next.

    The window here is of the last ``window`` calls admitted (requests in
    flight count as soon as they are sent).

    Identical means the same endpoint, model, messages (or input, system
    prompt, instructions), tools, tool choice and response format; sampling
    settings and output caps are ignored. The fingerprint is a hash salted
    per process: it identifies a request within a run, not across runs. This catches
    the loop that resends the very same request after every failed
    validation. Fingerprinting walks the request once, like the token
    estimate does.
    """

    __slots__ = ("limit", "name", "needs_fingerprint", "needs_price", "window")

    def __init__(
        self, limit: int, window: int = DEFAULT_LOOP_WINDOW, name: str = "max_identical_requests"
    ) -> None:
        self.name = name
        self.limit = limit
        self.window = window
        self.needs_price = False
        self.needs_fingerprint = True

    def admit(self, request: CallRequest, account: Account) -> Trip | None:
        fingerprint = request.fingerprint
        if fingerprint is None:
            return None
        sent = (account.state.get(self) or _window(self, self.window, account)).counts.get(
            fingerprint, 0
        )
        if sent < self.limit:
            return None
        return Trip(
            guard=self.name,
            reason=(
                f"this call to {request.model} repeats a request already sent {sent} times "
                f"within the last {self.window} calls (limit {self.limit})"
            ),
            limit=self.limit,
            observed=sent + 1,
            exception=LoopDetected,
            details={"fingerprint": f"{fingerprint & 0xFFFFFFFFFFFFFFFF:016x}"},
        )

    def admitted(self, request: CallRequest, account: Account) -> None:
        # counted when admitted, not when settled, so identical requests in
        # flight at the same time count too
        fingerprint = request.fingerprint
        keys = () if fingerprint is None else (fingerprint,)
        (account.state.get(self) or _window(self, self.window, account)).push(keys)

    def withdrawn(self, request: CallRequest, account: Account) -> None:
        # admitted, then not sent (a shared budget refused it): it was never a repeat
        fingerprint = request.fingerprint
        keys = () if fingerprint is None else (fingerprint,)
        _window(self, self.window, account).withdraw(keys)

    @inert
    def settled(self, request: CallRequest, result: CallResult, account: Account) -> Trip | None:
        return None

    def __repr__(self) -> str:
        return f"IdenticalRequests({self.limit!r}, window={self.window!r})"
