"""Online serving: ``fnllm serve`` under Poisson load vs offline ``LLM.generate``.

In the shape of vLLM's ``benchmark_serving``: the throughput workload of
``bench_throughput.py`` (random token prompts of 16..256 tokens, outputs of
32..128, greedy, ``ignore_eos``), sent as streaming ``/v1/completions``
requests by an async HTTP client (httpx) with Poisson arrivals at each
``--rates`` value (requests/s; ``inf``: all at once). Per rate it reports
TTFT, TPOT (per request: time after the first token over the tokens after
it) and ITL (gaps between streamed chunks), p50 and p99 in ms, and request and
output-token throughput. The yardstick, in the same run and on the same
requests: offline ``LLM.generate`` with the same engine settings, run after
the server has stopped. ``saturation_ratio`` is the all-at-once output
throughput over the offline one. ``idle_cpu_pct`` is the server process's
CPU use over ``--idle-seconds`` with no request (after a warm-up request).

The yardstick runs ``generate`` in a worker thread, as the server runs its
engine: on an oversubscribed machine OpenMP's spin-waiting made the same
``generate`` 5-10x slower in the main thread than in a worker thread
(``OMP_WAIT_POLICY=PASSIVE`` removed the gap), which would flatter the
server. ``--offline-main-thread`` measures it the plain way.

    python benchmarks/bench_serving.py [--num-prompts 64] [--rates 2,8,inf] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def workload(n: int, vocab: int, seed: int = 0):
    """The prompts and output lengths of bench_throughput.py (same generator, same seed)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(16, 256))] for _ in range(n)]
    outputs = [rng.randint(32, 128) for _ in range(n)]
    return prompts, outputs


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2)


# -- the server ----------------------------------------------------------------------------------


def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fnllm.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", args.dtype, "--device", "cpu", "--max-num-seqs", str(args.max_num_seqs),
           "--disable-uvicorn-access-log", *(["--model", args.model] if args.model else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fnllm serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("fnllm serve did not become healthy")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return round(100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0), 2)


# -- the load ------------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                times.append(time.perf_counter())
    end = time.perf_counter()
    ttft = times[0] - t0
    return {"ttft": ttft, "e2e": end - t0, "tokens": tokens, "itl": [b - a for a, b in zip(times, times[1:])],
            "tpot": (end - times[0]) / (tokens - 1) if tokens > 1 else None}


async def run_rate(url: str, prompts, outs, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:

        async def delayed(delay: float, p, m):
            await asyncio.sleep(delay)
            return await one_request(client, p, m)

        delays, t = [], 0.0
        for _ in prompts:
            delays.append(t)
            if rate != float("inf"):
                t += rng.expovariate(rate)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(delayed(d, p, m) for d, p, m in zip(delays, prompts, outs)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in res)
    assert tokens == sum(outs), (tokens, sum(outs))
    ttft, tpot = [r["ttft"] for r in res], [r["tpot"] for r in res if r["tpot"] is not None]
    itl = [x for r in res for x in r["itl"]]
    return {
        "rate": "inf" if rate == float("inf") else rate, "wall_s": round(wall, 2),
        "request_throughput": round(len(res) / wall, 3), "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_ms": {"p50": pct(ttft, 0.5), "p99": pct(ttft, 0.99)},
        "tpot_ms": {"p50": pct(tpot, 0.5), "p99": pct(tpot, 0.99)},
        "itl_ms": {"p50": pct(itl, 0.5), "p99": pct(itl, 0.99)},
    }


def offline(args, prompts, outs) -> dict:
    from fnllm.llm import LLM
    from fnllm.state import SamplingParams

    llm = LLM(args.model, dtype=args.dtype, device="cpu", max_num_seqs=args.max_num_seqs)
    llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in outs]
    box = {}

    def go() -> None:
        t0 = time.perf_counter()
        box["res"] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        box["wall"] = time.perf_counter() - t0

    if args.offline_main_thread:
        go()
    else:  # the server steps its engine in a worker thread: the yardstick does too (see the module docstring)
        t = threading.Thread(target=go)
        t.start()
        t.join()
    res, wall = box["res"], box["wall"]
    tokens = sum(len(r.outputs[0].token_ids) for r in res)
    return {"wall_s": round(wall, 2), "output_tokens_per_s": round(tokens / wall, 1),
            "request_throughput": round(len(prompts) / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--rates", default="2,8,inf", help="comma-separated requests/s; inf = all at once")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--idle-seconds", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--offline-main-thread", action="store_true", help="run the yardstick in the main thread")
    args = ap.parse_args()

    from fnllm.tokenizer import load_tokenizer
    from fnllm.llm import _model_path

    vocab = load_tokenizer(_model_path(args.model)).vocab_size
    prompts, outs = workload(args.num_prompts, vocab, args.seed)
    proc, url = start_server(args)
    try:
        asyncio.run(run_rate(url, prompts[:1], [4], float("inf"), 0))  # warm-up
        idle = idle_cpu(proc.pid, args.idle_seconds)
        runs = [asyncio.run(run_rate(url, prompts, outs, float(r), args.seed + 1)) for r in args.rates.split(",")]
    finally:
        proc.terminate()
        proc.wait(120)
    base = offline(args, prompts, outs)
    sat = max((r for r in runs if r["rate"] == "inf"), key=lambda r: r["output_tokens_per_s"], default=None)
    print(json.dumps({
        "benchmark": "serving", "dtype": args.dtype, "offline_in_main_thread": args.offline_main_thread, "num_prompts": args.num_prompts,
        "total_output_tokens": sum(outs), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "idle_cpu_pct": idle, "server": runs, "offline_llm_generate": base,
        "saturation_ratio": round(sat["output_tokens_per_s"] / base["output_tokens_per_s"], 3) if sat else None,
        "target": {"saturation_ratio": ">= 0.90", "idle_cpu_pct": "about 0"},
    }, indent=2))


if __name__ == "__main__":
    main()
