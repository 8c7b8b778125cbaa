"""Where RunGuard hooks each SDK. One module per SDK; none of them knows a limit.

Nothing here is imported by ``import runguard``: the hooks (and wrapt) load
on the first guard entry or :func:`instrument` call.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any

#: import name of each SDK -> the module of this package that reads it
SDKS: dict[str, str] = {"openai": "openai", "anthropic": "anthropic"}

_registered = False
_lock = threading.Lock()
#: SDK -> why it could not be hooked. wrapt runs an import hook once: after it
#: raised, a second ``import`` would hand back the SDK unhooked, so every later
#: guard entry raises the same error instead of counting nothing.
_refused: dict[str, Exception] = {}


def instrument() -> None:
    """Hook every supported SDK: now if imported, else the moment it is imported.

    Idempotent and cheap after the first call. It never imports an SDK; it
    waits for the user to. Raises :class:`runguard.InstrumentationError` if
    an installed SDK lacks a hook point (see :func:`missing_hooks`).
    """
    global _registered
    if _registered:
        if _refused:
            raise next(iter(_refused.values()))
        return
    import wrapt

    with _lock:
        if _registered:
            return
        for package, adapter in SDKS.items():
            wrapt.register_post_import_hook(_patcher(package, adapter), package)
        from . import mlflow_judges

        mlflow_judges.instrument()  # MLflow's judges post to providers without an SDK
        _registered = True


def _patcher(package: str, adapter: str) -> Any:
    def hook(_module: ModuleType) -> None:
        from ._stainless import patch

        try:
            patch(package, importlib.import_module(f"{__name__}.{adapter}"))
        except Exception as exc:
            _refused[package] = exc
            raise

    return hook


def missing_hooks(package: str) -> list[str]:
    """The private hook points an installed ``package`` lacks (empty: it can be guarded)."""
    from ._stainless import missing_hooks as missing

    adapter = SDKS.get(package)
    if adapter is None:
        return missing(package)
    module = importlib.import_module(f"{__name__}.{adapter}")
    return missing(package, module.attempt_method)
