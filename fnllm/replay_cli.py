"""``fnllm replay TRACE``: reproduce a recorded run, or take it apart.

Exit 0 when the run is reproduced, 1 with the first divergence otherwise.
"""

from __future__ import annotations

import sys

from fnllm.replay import compare_traces, format_state, state_at, summarise_change, verify, verify_device, what_if
from fnllm.trace import read_trace


def add_replay_parser(sub) -> None:
    r = sub.add_parser("replay", help="replay a recorded trace (see README: Replay debugging)")
    r.add_argument("trace")
    r.add_argument("--device", default=None, help="re-execute the plans on the model with this device (auto, cpu, ...)")
    r.add_argument("--step", type=int, default=None, help="print the state after step N")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="what-if: replay under a changed config")
    r.add_argument("--executor", choices=("fake", "model"), default="fake", help="what drives a what-if run")
    r.add_argument("--against", default=None, help="a second trace: find the first step where they differ")
    r.add_argument("--kv-offload-dir", default=None,
                   help="with --device: the disk KV tier the recorded run read from (its staged blocks are re-read)")
    r.set_defaults(run=run_replay)


def _model_executor(config, device: str):
    from fnllm.device.executor import ModelExecutor

    m, c = config.model, config.cache
    return ModelExecutor(m.model, dtype=m.dtype, device=device, num_blocks=c.num_blocks, block_size=c.block_size, seed=m.seed,
                         num_host_blocks=c.num_host_blocks)


def _what_if(trace, args) -> int:
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()

    def make(config):
        if args.executor == "model":
            return _model_executor(config, args.device or config.model.device)
        from fnllm.device.fake import FakeExecutor

        return FakeExecutor(config.cache.num_blocks, config.cache.block_size, config.model.vocab_size,
                            sliding_window=config.cache.sliding_window)

    base, other, changed = what_if(trace, overrides, make)
    print(f"what-if {overrides} (outputs from the {args.executor} executor):")
    print(summarise_change(base, other))
    return 0


def run_replay(args) -> int:
    trace = read_trace(args.trace)
    if trace.truncated:
        print(f"note: {args.trace} ends in an incomplete line (a crashed run); replaying up to it", file=sys.stderr)
    if args.against:
        d = compare_traces(trace, read_trace(args.against))
    elif args.step is not None:
        print(format_state(state_at(trace, args.step), trace.config))
        return 0
    elif args.set:
        return _what_if(trace, args)
    elif args.device:
        d = verify(trace)
        if d is None:
            ex = _model_executor(trace.config, args.device)
            stager = None
            if args.kv_offload_dir:
                from fnllm.offload import replay_stager

                stager = replay_stager(ex, args.kv_offload_dir)
            d = verify_device(trace, ex, on_stage=stager)
    else:
        d = verify(trace)
    if d is None:
        n = sum(1 for e in trace.events if e["type"] == "step")
        print(f"reproduced: {n} steps, every plan, state{' and output' if args.device else ''} identical")
        return 0
    print(f"diverged at {d}")
    return 1
