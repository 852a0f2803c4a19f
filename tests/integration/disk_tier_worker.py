"""One process of the disk-tier tests: serve two requests sharing a long
system prompt over a tiny checkpoint with a disk KV tier, print JSON.

usage: python disk_tier_worker.py CHECKPOINT OFFLOAD_DIR [TRACE]
"""

import json
import sys

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.device.executor import ModelExecutor
from fnllm.offload import open_offload
from fnllm.engine import LLMEngine
from fnllm.state import SamplingParams

SYSTEM = [(7 * k + 3) % 200 + 5 for k in range(40)]  # 10 blocks of 4
TAILS = [[11, 12, 13, 14, 15, 16], [21, 22, 23]]


def main(path: str, directory: str, trace: str | None = None) -> None:
    ex = ModelExecutor(path, num_blocks=64, block_size=4, device="cpu", num_host_blocks=32)
    config = EngineConfig(
        model=ModelConfig(model=path, vocab_size=ex.vocab_size),
        cache=CacheConfig(block_size=4, num_blocks=64, num_host_blocks=32),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_model_len=128),
    )
    offload = open_offload(ex, directory, 1 << 30)
    recorder = None
    if trace:
        from fnllm.trace import TraceWriter

        recorder = TraceWriter(trace)
    engine = LLMEngine(config, ex, kv_offload=offload, recorder=recorder)
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)  # logprobs: replay compares them
    result = {"tokens": [], "cached": []}
    for k, tail in enumerate(TAILS):  # one after the other: the second also hits the first's device blocks
        engine.add_request(f"r{k}", SYSTEM + tail, sp)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    result["tokens"].append(out.outputs[0].token_ids)
                    result["cached"].append(out.num_cached_tokens)
    offload.disk.flush()
    if recorder is not None:
        recorder.close()
    result.update(staged=offload.staged, rejected=offload.disk.rejected, swapped_in=ex.host_kv.swapped_in,
                  dir=offload.disk.dir)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
