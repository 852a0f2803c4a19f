"""Shutdown and engine death, end to end through ``run_server``:

- SIGTERM with requests in flight: they complete, new requests get 503, exit 0
  (the shared demo-model ``fnllm serve``; it is restarted if a later test needs it);
- past ``--shutdown-timeout`` the rest are aborted, exit 0 (stand-in device);
- a dead engine: streams end with an error event, ``/health`` is 503, exit 1
  (stand-in device).
"""

from __future__ import annotations

import asyncio
import json
import signal

import httpx

from tests.server.conftest import AUTH
from tests.server.server_support import ServerProcess


def _fake(tmp_path, *args: str) -> ServerProcess:
    return ServerProcess(["-m", "tests.server.fake_server", *args], tmp_path / "fake.log").wait_healthy(60)


async def _stream(client, body, started: asyncio.Event) -> tuple[list[dict], bool]:
    chunks, done = [], False
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        started.set()  # the engine has the request (it is added before the response starts)
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[6:]))
    return chunks, done


async def _sigterm_while_streaming(server: ServerProcess, bodies: list[dict], headers=None) -> tuple[list, int]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=headers) as client:
        events = [asyncio.Event() for _ in bodies]
        tasks = [asyncio.ensure_future(_stream(client, b, e)) for b, e in zip(bodies, events)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
        server.signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers) as fresh:
            late = await fresh.post("/v1/completions", json=bodies[0])
            health = await fresh.get("/health")
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        assert health.status_code == 503
        return await asyncio.gather(*tasks), late.status_code


def test_sigterm_lets_in_flight_requests_finish(server):
    """Uses (and ends) the shared demo-model server; this file runs last."""
    bodies = [{"prompt": f"Tell me story {k}.", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
              for k in range(3)]
    results, _ = asyncio.run(_sigterm_while_streaming(server, bodies, AUTH))
    for chunks, done in results:
        assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0
    assert server.proc.wait(60) == 0, server.log()


def test_shutdown_timeout_aborts_the_rest(tmp_path):
    server = _fake(tmp_path, "--step-delay", "0.02", "--shutdown-timeout", "3")
    try:
        bodies = [{"prompt": [5, 6, 7], "max_tokens": 900, "ignore_eos": True, "temperature": 0}]
        results, _ = asyncio.run(_sigterm_while_streaming(server, bodies))
        chunks, done = results[0]
        assert done and chunks[-1]["choices"][0]["finish_reason"] == "abort"
        assert server.proc.wait(30) == 0, server.log()
    finally:
        server.stop()


def test_engine_death_fails_streams_and_exits_nonzero(tmp_path):
    server = _fake(tmp_path, "--die-after", "5", "--step-delay", "0.01")
    try:
        body = {"prompt": [5, 6, 7], "max_tokens": 50, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "engine_dead" and "Traceback" not in error["message"]
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        assert server.proc.wait(30) == 1, server.log()
    finally:
        server.stop()
