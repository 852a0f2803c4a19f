"""Clients that go away: 32 concurrent streams, 8 dropped at random points,
and a non-streaming request whose connection drops. The rest complete with
``[DONE]``; afterwards the engine holds no request and every KV block is free."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from tests.server.conftest import AUTH
from tests.server.server_support import metric_values

HEADERS = AUTH


async def _stream(client: httpx.AsyncClient, k: int, drop_after: int | None) -> tuple[list[dict], bool]:
    body = {"model": "demo", "prompt": f"Story number {k}: once upon a time", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "stream": True}
    chunks, done = [], False
    async with client.stream("POST", "/v1/completions", json=body, headers=HEADERS) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunks.append(json.loads(line[6:]))
            if drop_after is not None and len(chunks) >= drop_after:
                break  # leaving the block unread closes the connection
    return chunks, done


async def _run(url: str) -> list:
    rng = random.Random(12)
    drops = dict.fromkeys(rng.sample(range(32), 8))
    for k in drops:
        drops[k] = rng.randint(1, 8)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        results = await asyncio.gather(*(_stream(client, k, drops.get(k)) for k in range(32)))
    return list(zip(range(32), results, [k in drops for k in range(32)]))


def _scrape(server) -> dict[str, float]:
    return metric_values(httpx.get(server.url + "/metrics", timeout=60).text)


def _wait_idle(server, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = _scrape(server)
        idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
        if (idle and m["vllm:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_dropped_streams_are_aborted_and_free_their_blocks(server):
    before = _scrape(server)
    results = asyncio.run(_run(server.url))
    for k, (chunks, done), dropped in results:
        if dropped:
            assert not done
            continue
        assert done, k
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and text, k
    after = _wait_idle(server)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0  # every block free (cached-but-free blocks count as free)
    aborted = after["vllm:request_success_total{finished_reason=abort}"] - before[
        "vllm:request_success_total{finished_reason=abort}"]
    assert aborted == 8
    assert after["vllm:request_success_total{finished_reason=length}"] - before[
        "vllm:request_success_total{finished_reason=length}"] == 24
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_dropped_non_streaming_request_is_aborted(server):
    before = _scrape(server)
    body = {"model": "demo", "prompt": "Count to a thousand:", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", json=body, headers=HEADERS, timeout=1.0)
        raise AssertionError("the request should not finish within a second")
    except httpx.ReadTimeout:
        pass  # the client gives up and closes the connection
    after = _wait_idle(server)
    assert after["vllm:request_success_total{finished_reason=abort}"] - before[
        "vllm:request_success_total{finished_reason=abort}"] == 1
    assert after["vllm:kv_cache_usage_perc"] == 0 and after["vllm:num_requests_running"] == 0
