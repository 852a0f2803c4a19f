"""``fnllm simulate`` and ``fnllm calibrate``.

``simulate`` runs a workload through the production scheduler on a virtual
clock (:mod:`fnllm.sim`); ``calibrate`` times real steps on this machine and
writes a cost file (:mod:`fnllm.calibrate`). Bad input is a ``ValueError``,
which ``fnllm.cli.main`` prints as one ``fnllm: error: ...`` line (exit 2).
"""

from __future__ import annotations

import json
import sys

DEFAULT_COST_MODEL = "smollm2-135m-cpu"


def add_sim_parsers(sub) -> None:
    s = sub.add_parser("simulate", help="simulate a workload with the production scheduler and a cost model")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", help="JSON lines {arrival, prompt_len, output_len[, prompt_token_ids, request_id]}, or an fnllm trace")
    src.add_argument("--synthetic", help='e.g. "n=2000,rate=8,prompt=U(64,1024),output=U(32,512),seed=0"')
    s.add_argument("--cost-model", default=DEFAULT_COST_MODEL,
                   help=f"a cost file (fnllm calibrate) or a bundled profile name (default: {DEFAULT_COST_MODEL})")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override as in replay's what-if (max_num_seqs=32, cache.block_size=8, ...), or tp=, pp=, rate=")
    s.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...", help="one row per value (repeatable: all combinations)")
    s.add_argument("--slo", default=None, metavar='"ttft_p99=2,tpot_p99=0.1"', help="per configuration, the highest rate meeting these limits (seconds)")
    s.add_argument("--plot", default=None, metavar="OUT.png", help="latency percentiles and KV usage over time")
    s.add_argument("--json", action="store_true", help="print JSON (one object per configuration)")
    s.set_defaults(run=run_simulate)

    c = sub.add_parser("calibrate", help="time real steps on this device and fit a cost model")
    c.add_argument("--model", default=None, help="HF directory or .gguf file (default: the demo SmolLM2 model)")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    c.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "npu"))
    c.add_argument("--out", required=True, help="where to write the cost file (JSON)")
    c.add_argument("--grid", default="standard", choices=("quick", "standard"), help="how many step shapes to time")
    c.add_argument("--repeats", type=int, default=3, help="timings per shape (the median is fitted)")
    c.set_defaults(run=run_calibrate)


def _source(args):
    from fnllm.sim.workload import parse_synthetic, read_workload

    if args.synthetic is not None:
        return parse_synthetic(args.synthetic)
    return read_workload(args.workload)


def _run_one(source, setup, rate=None):
    from fnllm.sim.loop import simulate
    from fnllm.sim.report import sim_metrics
    from fnllm.sim.search import workload_at

    res = simulate(workload_at(source, rate if rate is not None else setup.rate), setup.config, setup.cost)
    return res, sim_metrics(res)


def _label(assign: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in assign.items()) or "default"


def run_simulate(args) -> int:
    from fnllm.sim.cost import load_cost_model
    from fnllm.sim.report import rounded, table
    from fnllm.sim.search import max_rate, parse_assignments, parse_slo, parse_sweeps, resolve

    cost = load_cost_model(args.cost_model)
    source = _source(args)
    base = parse_assignments(args.set)
    combos = parse_sweeps(args.sweep)
    slo = parse_slo(args.slo) if args.slo else None
    setups = [(dict(base, **c), resolve(None, cost, dict(base, **c))) for c in combos]  # validate all first
    rows, last = [], None
    for assign, setup in setups:
        if slo is None:
            last, m = _run_one(source, setup)
        else:
            from fnllm.sim.search import workload_at
            from fnllm.sim.workload import mean_rate

            start = setup.rate or mean_rate(workload_at(source, None))
            rate, m = max_rate(lambda r: _run_one(source, setup, r)[1], slo, start=start)
            m = dict(m or {}, max_rate_rps=rate)
        m = dict(m, num_blocks=setup.config.cache.num_blocks, block_size=setup.config.cache.block_size,
                 max_num_seqs=setup.config.scheduler.max_num_seqs,
                 max_num_batched_tokens=setup.config.scheduler.max_num_batched_tokens, tp=setup.cost.tp, pp=setup.cost.pp)
        rows.append((_label(assign), m))
    if args.json:
        for label, m in rows:
            print(json.dumps(dict(rounded(m), config=label)))
    else:
        cols = ("max_rate_rps",) + ("ttft_p99_s", "tpot_p99_s", "throughput_tok_s", "num_blocks") if slo else None
        print(table(rows, cols) if cols else table(rows))
    if args.plot:
        if last is None:
            raise ValueError("--plot draws one simulated run; it does not combine with --slo")
        from fnllm.sim.plot import plot

        plot(last, args.plot, title=f"{args.cost_model}: {rows[-1][0]}")
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def run_calibrate(args) -> int:
    from fnllm.calibrate import calibrate

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    calibrate(args.model, dtype=args.dtype, device=args.device, out=args.out, grid_kind=args.grid, repeats=args.repeats)
    return 0
