"""``run_server`` over the stand-in device (no model, token-id prompts only),
for the lifecycle tests: ``--die-after N`` makes the executor fail from its
N+1-th step on, ``--step-delay S`` slows every step.

    python -m tests.server.fake_server --port P [--die-after N] [--step-delay S] [--shutdown-timeout S]
"""

from __future__ import annotations

import argparse
import sys
import time

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.server.api_server import run_server
from fnllm.server.async_engine import AsyncLLMEngine


class SlowOrDyingExecutor(FakeExecutor):
    def __init__(self, die_after: int | None, delay: float) -> None:
        super().__init__(256, 4, vocab_size=97)
        self.die_after, self.delay, self.steps = die_after, delay, 0

    def execute(self, plan):
        self.steps += 1
        if self.die_after is not None and self.steps > self.die_after:
            raise RuntimeError("device lost")
        time.sleep(self.delay)
        return super().execute(plan)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    args = p.parse_args()
    config = EngineConfig(model=ModelConfig(vocab_size=97, eos_token_ids=(0,)),
                          cache=CacheConfig(block_size=4, num_blocks=256),
                          scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_model_len=1024))
    # a dying device kills the engine at its first failed step (with the default of 3, a lone
    # request on a failing device first ends with finish_reason "error"; see README: Failures)
    failures = 1 if args.die_after is not None else 3
    engine = AsyncLLMEngine(LLMEngine(config, SlowOrDyingExecutor(args.die_after, args.step_delay),
                                      max_consecutive_failures=failures))
    return run_server(engine, ["fake"], host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
                      access_log=False, dead_grace=3.0)


if __name__ == "__main__":
    sys.exit(main())
