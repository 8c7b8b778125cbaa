"""A stand-in package shaped like a Stainless SDK, minus one hook point.

For the tests of an SDK whose private hooks moved (``test_sdk_hooks.py``,
``test_openai.py``). The stand-in's clients record what they would send in
``_base_client.SENT``: its wire.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

BASE_CLIENT = """
SENT = []


class BaseClient:
    def _process_response_data(self, *, data, cast_to, response):
        return data


class SyncAPIClient(BaseClient):
    def request(self, cast_to, options, *, stream=False, stream_cls=None):
        SENT.append(options)  # the stand-in's wire

    def {attempt}(self, *args, **kwargs):
        return None


class AsyncAPIClient(BaseClient):
    async def request(self, cast_to, options, *, stream=False, stream_cls=None):
        SENT.append(options)

    async def {attempt}(self, *args, **kwargs):
        return None
"""

STREAMING = """
class Stream:
    def __stream__(self):
        yield from ()


class AsyncStream:
    async def __stream__(self):
        if False:
            yield None
"""

#: each SDK's per-attempt hook point
ATTEMPT = {"openai": "_send_request", "anthropic": "_attempt_request"}


def write_stand_in(
    root: Path,
    name: str,
    attempt: str,
    missing: tuple[str, str],
    version: str = "0.0.0-moved",
    import_submodules: bool = True,
) -> Path:
    """Write package ``name`` under ``root``: every hook point but ``missing`` (class, method).

    ``attempt`` names its per-attempt method; with ``import_submodules`` the
    package imports its ``_base_client`` and ``_streaming``, as the SDKs do.
    """
    package = root / name
    package.mkdir()
    imports = "from . import _base_client, _streaming\n" if import_submodules else ""
    (package / "__init__.py").write_text(f'__version__ = "{version}"\n{imports}')
    source = textwrap.dedent(BASE_CLIENT).format(attempt=attempt)
    # deleting after the class bodies keeps the stand-in's source one template
    cls, method = missing
    (package / "_base_client.py").write_text(f"{source}\n\ndel {cls}.{method}\n")
    (package / "_streaming.py").write_text(textwrap.dedent(STREAMING))
    return package
