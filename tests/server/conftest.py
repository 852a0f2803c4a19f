"""One shared ``fnllm serve`` (demo model, an API key) for the server tests."""

from __future__ import annotations

import pytest

from tests.server.server_support import start_serve

API_KEY = "sk-fnllm-test"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    proc = start_serve(tmp_path_factory.mktemp("serve"), "--api-key", API_KEY, "--served-model-name", "demo")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c

