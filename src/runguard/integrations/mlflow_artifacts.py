"""Artifact writes MLflow makes inside a RunGuard: counted, refused over a ceiling, or consolidated.

Every artifact API of MLflow — fluent ``log_artifact(s)``, ``log_text``,
``log_dict``, ``log_image``, ``log_figure``, ``log_table`` and their
``MlflowClient`` twins — ends in one of three methods of the tracking
service client (``log_artifact``, ``log_artifacts``, and
``_log_artifact_async`` for images logged asynchronously). Those are the
choke point: each write is measured there (files, bytes) and admitted by the
ledger before anything is uploaded.

Consolidation sits one level up, on ``MlflowClient.log_text`` and
``log_dict`` (where the text or mapping is still in hand): inside a
``RunGuard(consolidate_artifacts=True)`` a small one is buffered instead of
uploaded, and the buffer is written as one JSON artifact when the guard
exits, tripped or not.

The hooks are installed when ``mlflow`` is imported (never importing it
themselves); outside any guard they only look up the active guards.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

from .._ledger import LEDGER, Account
from .._records import ArtifactWrite
from .._scope import active_accounts
from ..steps import current_step

#: text or JSON larger than this is uploaded as usual, even when consolidating
SMALL_BYTES = 256 * 1024

_internal: ContextVar[bool] = ContextVar("runguard_internal_write", default=False)
_watching = False
_lock = threading.Lock()


@contextmanager
def internal() -> Iterator[None]:
    """RunGuard's own writes (its ledger, a consolidated buffer) are neither counted nor held."""
    token = _internal.set(True)
    try:
        yield
    finally:
        _internal.reset(token)


def watch() -> None:
    """Hook MLflow's artifact writes: now if it is imported, else when it is. Idempotent."""
    global _watching
    if _watching:
        return
    import wrapt

    with _lock:
        if not _watching:
            wrapt.register_post_import_hook(_install, "mlflow.tracking.client")
            _watching = True


def _install(_module: object) -> None:
    import wrapt
    from mlflow.tracking import client
    from mlflow.tracking._tracking_service import client as service

    tracking = service.TrackingServiceClient
    # feature-detected: an install without artifact support has nothing to count
    for name, measure in (
        ("log_artifact", _measure_path),
        ("log_artifacts", _measure_dir),
        ("_log_artifact_async", _measure_object),
    ):
        if callable(getattr(tracking, name, None)):
            wrapt.wrap_function_wrapper(tracking, name, _counting(measure))
    for name in ("log_text", "log_dict"):
        if callable(getattr(client.MlflowClient, name, None)):
            wrapt.wrap_function_wrapper(client.MlflowClient, name, _consolidating)


def _counting(measure: Any) -> Any:
    def count(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        accounts = active_accounts()
        if accounts and not _internal.get():
            LEDGER.write_artifact(accounts, measure(*args, **kwargs))
        return wrapped(*args, **kwargs)

    return count


def _measure_path(run_id: str, local_path: Any, artifact_path: str | None = None) -> ArtifactWrite:
    path = os.fspath(local_path)
    if os.path.isdir(path):
        return _measure_dir(run_id, path, artifact_path)
    return ArtifactWrite(1, os.path.getsize(path), _joined(artifact_path, path))


def _measure_dir(run_id: str, local_dir: Any, artifact_path: str | None = None) -> ArtifactWrite:
    files = size = 0
    for root, _dirs, names in os.walk(os.fspath(local_dir)):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return ArtifactWrite(files, size, _joined(artifact_path, os.fspath(local_dir)))


def _measure_object(
    run_id: str, filename: str, artifact_path: str | None = None, artifact: Any = None
) -> ArtifactWrite:
    # an image MLflow encodes later, in its upload thread: charged its raw pixel
    # size, an estimate of the file it becomes (not measured, to keep the encoding
    # off the agent's thread)
    size = getattr(artifact, "nbytes", None)
    if size is None:
        width, height = getattr(artifact, "size", (0, 0))
        size = width * height * len(getattr(artifact, "getbands", tuple)())
    return ArtifactWrite(1, int(size), _joined(artifact_path, filename))


def _joined(directory: str | None, path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return f"{directory}/{name}" if directory else name


# -- consolidation ---------------------------------------------------------------------


def _consolidating(
    wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    accounts = active_accounts()
    if not accounts or _internal.get():
        return wrapped(*args, **kwargs)
    holder = next((a for a in accounts if a.consolidates), None)
    if holder is None:
        return wrapped(*args, **kwargs)
    run_id, content, name = _arguments(*args, **kwargs)
    frozen = _frozen(content)
    if frozen is None or frozen[1] > SMALL_BYTES:
        return wrapped(*args, **kwargs)
    # counted now (bytes, no file of its own): a ceiling stops a runaway buffer
    LEDGER.write_artifact(accounts, ArtifactWrite(0, frozen[1], name))
    kind = "text" if wrapped.__name__ == "log_text" else "dict"
    hold(holder, run_id, kind, frozen[0], name=name)
    return None


def _arguments(run_id: str, *given: Any, **named: Any) -> tuple[str, Any, str]:
    # log_text(run_id, text, artifact_file) / log_dict(run_id, dictionary, artifact_file)
    content = given[0] if given else named.get("text", named.get("dictionary"))
    artifact_file = given[1] if len(given) > 1 else named["artifact_file"]
    return run_id, content, str(artifact_file)


def _frozen(content: Any, default: Any = None) -> tuple[Any, int] | None:
    """``content`` as it is now (a caller may mutate it after logging) and its size in bytes.

    None when it is not JSON (and no ``default`` makes it so): then MLflow
    writes it, or fails, as usual.
    """
    if isinstance(content, str):
        return content, len(content.encode("utf-8", "replace"))
    try:
        text = json.dumps(content, default=default)
    except (TypeError, ValueError):
        return None
    return json.loads(text), len(text.encode("utf-8"))


def frozen_output(output: Any) -> Any:
    """A tool output as it is now: a JSON copy, values JSON cannot hold written with ``str``."""
    frozen = _frozen(output, default=str)
    return str(output) if frozen is None else frozen[0]


def hold(
    account: Account,
    run: object,
    kind: str,
    content: Any,
    *,
    name: str | None = None,
    step: str | int | None = None,
    tool: str | None = None,
) -> None:
    """Append one entry to the guard's buffer, in call order."""
    buffer = account.artifacts
    if step is None:
        step = current_step()[0]
    with _lock:
        entry: dict[str, Any] = {"seq": len(buffer)}
        buffer.append((run, entry))
    entry |= {
        "kind": kind,
        "name": name,
        "step": step,
        "tool": tool,
        "time": datetime.fromtimestamp(time.time(), timezone.utc).isoformat(),
        "content": content,
    }
