"""API key (401 without it, constant-time comparison in the server) and
``/metrics`` (parses with prometheus_client; the counters move with a request)."""

from __future__ import annotations

import httpx

from tests.server.conftest import API_KEY
from tests.server.server_support import metric_values

BODY = {"model": "demo", "prompt": "The sky is", "max_tokens": 5, "temperature": 0}


def test_v1_needs_the_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"X-Api-Key": API_KEY}):
        r = httpx.post(server.url + "/v1/completions", json=BODY, headers=headers, timeout=60)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models", headers=headers, timeout=60).status_code == 401
    good = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(server.url + "/v1/models", headers=good, timeout=60).status_code == 200
    assert httpx.post(server.url + "/v1/completions", json=BODY, headers=good, timeout=60).status_code == 200
    assert httpx.get(server.url + "/health", timeout=60).status_code == 200  # outside /v1: open
    assert httpx.get(server.url + "/version", timeout=60).json()["version"]


def test_metrics_parse_and_move(server):
    def scrape() -> dict[str, float]:
        r = httpx.get(server.url + "/metrics", timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return metric_values(r.text)

    before = scrape()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:time_to_first_token_seconds_count", "vllm:time_per_output_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_success_total{finished_reason=length}"):
        assert name in before, name
    body = {**BODY, "prompt": "A long and shared prefix for the cache test, " * 4 + "then the end", "ignore_eos": True}
    good = {"Authorization": f"Bearer {API_KEY}"}
    usage = [httpx.post(server.url + "/v1/completions", json=body, headers=good, timeout=60).json()["usage"]
             for _ in range(2)]
    after = scrape()

    def delta(name: str) -> float:
        return after[name] - before[name]

    assert delta("vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:generation_tokens_total") == sum(u["completion_tokens"] for u in usage) == 10
    assert delta("vllm:request_success_total{finished_reason=length}") == 2
    assert delta("vllm:time_to_first_token_seconds_count") == 2
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert delta("vllm:time_per_output_token_seconds_count") == 2
    assert delta("vllm:prefix_cache_queries_total") == sum(u["prompt_tokens"] for u in usage)
    assert delta("vllm:prefix_cache_hits_total") >= 32  # the second request found the first one's full blocks
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
