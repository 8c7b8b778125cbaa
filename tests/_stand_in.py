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
{answers}

class SyncAPIClient(BaseClient):
    def request(self, cast_to, options, *, stream=False, stream_cls=None):
        SENT.append(options)  # the stand-in's wire

    def {attempt}(self, *args, **kwargs):
        return None

    def _process_response(self, *, cast_to, options, response, stream, stream_cls):
        return None


class AsyncAPIClient(BaseClient):
    async def request(self, cast_to, options, *, stream=False, stream_cls=None):
        SENT.append(options)

    async def {attempt}(self, *args, **kwargs):
        return None

    async def _process_response(self, *, cast_to, options, response, stream, stream_cls):
        return None
"""

#: what an SDK without a per-attempt method has instead (openai before 2.31)
ANSWERS = """
    def _build_request(self, options):
        return None

    def _should_retry(self, response):
        return False

    def _make_status_error_from_response(self, response):
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
    *missing: tuple[str, str],
    version: str = "0.0.0-moved",
    import_submodules: bool = True,
    answers: bool = False,
) -> Path:
    """Write package ``name`` under ``root``: every hook point but ``missing`` (class, method).

    ``attempt`` names its per-attempt method; with ``answers`` the package also
    has the methods RunGuard hooks when that one is missing. With
    ``import_submodules`` it imports its ``_base_client`` and ``_streaming``,
    as the SDKs do.
    """
    package = root / name
    package.mkdir()
    imports = "from . import _base_client, _streaming\n" if import_submodules else ""
    (package / "__init__.py").write_text(f'__version__ = "{version}"\n{imports}')
    source = textwrap.dedent(BASE_CLIENT).format(
        attempt=attempt, answers=ANSWERS if answers else ""
    )
    # deleting after the class bodies keeps the stand-in's source one template
    deletions = "".join(f"del {cls}.{method}\n" for cls, method in missing)
    (package / "_base_client.py").write_text(f"{source}\n\n{deletions}")
    (package / "_streaming.py").write_text(textwrap.dedent(STREAMING))
    return package
