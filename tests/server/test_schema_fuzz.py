"""schemathesis against the live server's ``/openapi.json``: no generated input,
valid or not, gets a 5xx. Examples are bounded in count, and generation
lengths are clamped so that every example stays cheap."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.server.conftest import API_KEY

CLAMP = {"max_tokens": 4, "max_completion_tokens": 4, "n": 2, "min_tokens": 2}


def bound(case) -> None:
    body = case.body
    if isinstance(body, dict):
        for key, top in CLAMP.items():
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > top:
                body[key] = top
        if "messages" in body and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = 4  # the chat default (what max_model_len leaves) would be long


def test_no_server_errors(server):
    """Every operation, positive (valid) and negative (invalid) inputs."""
    api = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [r.ok() for r in api.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for op in ops:
        post = op.method.upper() == "POST"  # GETs take no input: nothing negative to generate
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if post else (GenerationMode.POSITIVE,):
            examples = 12 if post else 2

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                bound(case)
                response = case.call(base_url=server.url, headers=headers, timeout=60)
                assert response.status_code < 500, (op.path, case.body, response.text)
                if response.status_code >= 400 and op.path != "/metrics":
                    err = response.json()["error"]
                    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]

            check()
