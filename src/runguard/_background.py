"""A daemon thread that runs jobs off the agent's path (webhook alerts, MLflow writes)."""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable


class Background:
    """Runs each queued job on one daemon thread, started on first use.

    ``drain`` waits until every queued job has run (or failed); at interpreter
    exit it is called with ``exit_wait`` so a short script does not lose its
    last jobs, and a hung job cannot hold the exit longer than that. A job
    must handle its own errors: whatever it raises is dropped.
    """

    def __init__(self, name: str, exit_wait: float) -> None:
        self._name = name
        self._exit_wait = exit_wait
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._pending = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                if self._thread is None:
                    atexit.register(self.drain, self._exit_wait)
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put(job)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:
                pass  # jobs report their own failures; the thread must live on
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until no job is queued or running; True if that happened within ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)
