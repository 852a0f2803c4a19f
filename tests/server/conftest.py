"""One shared ``fnllm serve`` (demo model, an API key) for the server tests.

The process is started once per session; a test that stops it (the SIGTERM
test, which runs last) leaves the next user of ``server`` a fresh one.
"""

from __future__ import annotations

import pytest

from tests.server.server_support import start_serve

API_KEY = "sk-fnllm-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def _servers(tmp_path_factory):
    started = []
    yield started, tmp_path_factory
    for proc in started:
        proc.stop()


@pytest.fixture
def server(_servers):
    started, factory = _servers
    if not started or started[-1].proc.poll() is not None:
        started.append(start_serve(factory.mktemp("serve"), "--api-key", API_KEY, "--served-model-name", "demo"))
    return started[-1]


@pytest.fixture
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c
