"""Validation of ``fnllm simulate``: predicted against measured, same run.

1. Calibrates the demo model on this CPU (``fnllm.calibrate``; or ``--cost FILE``).
2. For three configurations (roomy; cramped, with preemptions; a small token
   budget with chunked prefill) runs one Poisson workload twice: through the
   real engine (``LLMEngine`` on the model, wall clock, requests added when
   their arrival time passes) and through the simulator (the same config,
   workload and prompt ids, the calibrated cost model). Reports predicted and
   measured throughput, mean and p90 TTFT, mean TPOT and preemptions, and the
   relative error of each (target 10 %, goal 5 %).
3. Times the simulator on a large synthetic workload (default 100,000
   requests): simulated requests per second of wall time (target 5,000).

The arrival rate defaults to 70 % of the capacity the calibrated model
predicts for the roomy config, so that queues form but do not run away.
Prints one JSON object.

    python benchmarks/bench_simulator.py [--dtype bfloat16] [--requests 40] [--rate R] [--cost FILE]
        [--speed-requests 100000] [--skip-real] [--save-cost FILE] [--threads 1] [--grid standard|quick] [--clock wall|cpu]

``--clock cpu`` measures both the calibration and the real runs in this
process's CPU time (one torch thread), so that other jobs on a shared machine
do not count; arrivals then follow that clock too.

Both the calibration and the real engine run with their KV cache's pages
mapped up front (``populate_kv``): the simulator predicts a warm server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attrs  # noqa: E402

from fnllm.sim.cost import load_cost_model  # noqa: E402
from fnllm.sim.loop import _request_params, simulate  # noqa: E402
from fnllm.sim.report import metrics, sim_metrics  # noqa: E402
from fnllm.sim.workload import prompt_ids, synthetic  # noqa: E402

COMPARED = ("throughput_tok_s", "ttft_mean_s", "ttft_p90_s", "tpot_mean_s")


def configs(base):
    """roomy (LLM's defaults), cramped (few KV blocks: preemptions), small budget (chunked prefill)."""
    sched, cache = base.scheduler, base.cache
    return {
        "roomy": base,
        "cramped": attrs.evolve(base, cache=attrs.evolve(cache, num_blocks=40)),
        "small_budget": attrs.evolve(base, scheduler=attrs.evolve(sched, max_num_batched_tokens=64)),
    }


class CpuClock:
    """This process's CPU time, plus the idle gaps skipped while waiting for
    arrivals: on a shared machine, time that other processes take from us
    does not count (``--clock cpu``; one torch thread)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.process_time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.offset += max(0.0, seconds)


class WallClock:
    def __call__(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


def run_real(engine_cls, config, executor, work, clock) -> tuple[dict, list]:
    """The real engine on the model: requests added as their arrival time passes."""
    engine = engine_cls(config, executor, None, clock=clock)
    vocab, avoid = config.model.vocab_size, frozenset(config.model.eos_token_ids)
    ids = [list(prompt_ids(it, k, vocab, avoid)) for k, it in enumerate(work)]
    arrival, first, finish, out_len = {}, {}, {}, {}
    peak, k, n = 0, 0, len(work)
    steps = []  # (plan, measured seconds) of every step that ran rows
    t0 = clock()
    while k < n or engine.has_unfinished_requests():
        now = clock() - t0
        while k < n and work[k].arrival <= now:
            engine.add_request(work[k].request_id, ids[k], _request_params(work[k]))
            arrival[work[k].request_id] = work[k].arrival
            k += 1
        if not engine.has_unfinished_requests():
            clock.sleep(work[k].arrival - (clock() - t0))
            continue
        ts = clock()
        outs = engine.step()
        t = clock() - t0
        if engine.last_plan is not None and len(engine.last_plan):
            steps.append((engine.last_plan, clock() - ts))
        for rid in engine.last_news.request_ids:  # requests run FINAL_ONLY, as in the simulator
            if rid not in first:
                first[rid] = t
        for o in outs:
            if o.finished:
                finish[o.request_id] = t
                out_len[o.request_id] = sum(len(c.token_ids) for c in o.outputs)
        peak = max(peak, config.cache.num_blocks - engine.state.pool.num_free)
    m = metrics(arrival, first, finish, out_len, preemptions=engine.state.num_preemptions,
                peak_kv_usage=peak / config.cache.num_blocks)
    return m, steps


def step_errors(steps, cost) -> dict:
    """The cost model against the real run's own steps, by kind of step:
    where the simulator's time goes wrong (decode only, prefill only, mixed)."""
    kinds: dict = {}
    for plan, secs in steps:
        multi = sum(1 for t in plan.token_ids if len(t) > 1)
        kind = "decode" if not multi else ("prefill" if multi == len(plan) else "mixed")
        k = kinds.setdefault(kind, [0, 0.0, 0.0])
        k[0] += 1
        k[1] += secs
        k[2] += cost.step_seconds(plan)
    return {kind: {"steps": n, "measured_ms": round(m / n * 1e3, 2), "predicted_ms": round(p / n * 1e3, 2),
                   "rel_error": round((p - m) / m, 4)} for kind, (n, m, p) in sorted(kinds.items())}


def capacity_rate(work, config, cost) -> float:
    """Requests/s the cost model predicts the config sustains (everything at once)."""
    burst = tuple(attrs.evolve(it, arrival=0.0) for it in work)
    m = sim_metrics(simulate(burst, config, cost))
    return m["requests"] / m["duration_s"]


def rel(pred: float, meas: float) -> float:
    return round((pred - meas) / meas, 4) if meas else float("nan")


def speed(cost, config, n: int) -> dict:
    """Simulated requests per second of wall time on ``n`` requests arriving at
    90 % of the capacity the cost model predicts (queues stay bounded, as in
    a capacity study; the waiting queue's cost is the core's, see the report)."""
    probe = synthetic("n=2000,rate=1,prompt=U(16,128),output=U(8,64),seed=1")
    rate = 0.9 * capacity_rate(probe, config, cost)
    work = synthetic(f"n={n},rate={rate},prompt=U(16,128),output=U(8,64),seed=1")
    t, c = time.perf_counter(), time.process_time()
    res = simulate(work, config, cost)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"requests": n, "rate_rps": round(rate, 2), "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 1),
            "cpu_s": round(cpu, 2), "requests_per_cpu_s": round(n / cpu, 1),
            "steps": res.steps, "steps_per_s": round(res.steps / wall, 1), "us_per_step": round(wall / res.steps * 1e6, 1),
            "generated_tokens": sum(res.output_len.values()), "target_requests_per_s": 5000}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--cost", default=None, help="use this cost file instead of calibrating")
    ap.add_argument("--save-cost", default=None, help="keep the calibrated cost file here")
    ap.add_argument("--speed-requests", type=int, default=100_000)
    ap.add_argument("--calibrate-repeats", type=int, default=5, help="timing rounds over the calibration grid")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for calibration and the real runs (1: stable timings on a shared machine)")
    ap.add_argument("--grid", default="standard", choices=("quick", "standard"))
    ap.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                    help="wall: real time; cpu: this process's CPU time (calibration and real runs), for a shared machine")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    load_1 = os.getloadavg()[0]
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch_threads": args.threads, "clock": args.clock,
           "load_avg_1m_start": round(load_1, 2)}
    from fnllm.calibrate import calibrate
    from fnllm.engine import LLMEngine
    from fnllm.llm import LLM

    t = time.perf_counter()
    llm = LLM(None, dtype=args.dtype, device="cpu")
    out["load_s"] = round(time.perf_counter() - t, 1)
    if args.cost:
        cost = load_cost_model(args.cost)
    else:
        path = args.save_cost or os.path.join(tempfile.mkdtemp(), "cost.json")
        t = time.perf_counter()
        cost = calibrate(None, dtype=args.dtype, device="cpu", out=path, grid_kind=args.grid, repeats=args.calibrate_repeats,
                         log=lambda *a: print(*a, file=sys.stderr),
                         timer=time.process_time if args.clock == "cpu" else time.perf_counter)
        out["calibrate_s"] = round(time.perf_counter() - t, 1)
    out["fit_mean_abs_rel_error"] = cost.meta.get("fit_mean_abs_rel_error")
    base = llm.llm_engine.config
    # a warm server: the KV cache's pages mapped, as calibrate maps its own (a first write to a
    # fresh page costs 4-18 us on a VM; ~8 % of a prefill step into fresh blocks)
    out["kv_populated"] = llm.llm_engine.executor.populate_kv()
    out["cost_file_config_is_llm_default"] = cost.engine_config() == base
    work = synthetic(f"n={args.requests},rate=1,prompt=U(32,256),output=U(16,96),seed=7")
    rate = args.rate or round(0.7 * capacity_rate(work, base, cost), 3)
    work = synthetic(f"n={args.requests},rate={rate},prompt=U(32,256),output=U(16,96),seed=7")
    out["workload"] = {"requests": args.requests, "rate_rps": rate, "prompt": "U(32,256)", "output": "U(16,96)", "poisson": True}
    rows = {}
    for name, config in configs(base).items():
        pred = sim_metrics(simulate(work, config, cost))
        row = {"predicted": {k: round(pred[k], 4) for k in COMPARED + ("preemptions",)}}
        if not args.skip_real:
            meas, steps = run_real(LLMEngine, config, llm.llm_engine.executor, work, CpuClock() if args.clock == "cpu" else WallClock())
            row["measured"] = {k: round(meas[k], 4) for k in COMPARED + ("preemptions",)}
            row["step_time_by_kind"] = step_errors(steps, cost)
            row["rel_error"] = {k: rel(pred[k], meas[k]) for k in COMPARED}
            row["within_10pct"] = all(abs(v) <= 0.10 for v in row["rel_error"].values())
        rows[name] = row
        row["load_avg_1m"] = round(os.getloadavg()[0], 2)
        print(json.dumps({name: row}), file=sys.stderr)
    out["validation"] = rows
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    if args.speed_requests:
        out["simulator_speed"] = speed(cost, attrs.evolve(base, scheduler=attrs.evolve(base.scheduler, max_num_seqs=256)),
                                       args.speed_requests)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
