"""``LLM``: the offline API, with vLLM's names.

``LLM(model=...)`` loads a Hugging Face directory or a ``.gguf`` file (the
demo SmolLM2 model when ``model`` is None), sizes the KV cache from
``num_kv_blocks`` or ``kv_cache_memory`` (bytes), and serves ``generate``
and ``chat`` through an :class:`~fnllm.engine.LLMEngine`.

``swap_space`` (GiB of host memory, vLLM's name) sizes the host KV tier:
swapped-out sequences under ``preemption_mode="swap"`` and, with prefix
caching, cached blocks evicted from the device. Default: 4 GiB under swap
preemption or with a disk tier, none otherwise. ``kv_offload_dir`` adds the
disk tier (:mod:`fnllm.device.kv_disk`), bounded by ``kv_offload_bytes``.
"""

from __future__ import annotations

import itertools
import time
from typing import Sequence

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.engine import LLMEngine, PromptType
from fnllm.outputs import RequestOutput
from fnllm.state import SamplingParams

DEFAULT_KV_MEMORY = 1 << 30  # 1 GiB
DEFAULT_SWAP_SPACE = 4  # GiB, vLLM's default, used under preemption_mode="swap" or with a disk tier
DEFAULT_KV_OFFLOAD_BYTES = 16 << 30


def _tier_args(swap_space, preemption_mode, kv_offload_dir, kv_offload_bytes, enable_prefix_caching) -> float:
    """Validate the KV-tier arguments; the host tier's size in GiB."""
    SchedulerConfig(preemption_mode=preemption_mode)
    if kv_offload_dir is not None and not enable_prefix_caching:
        raise ValueError("kv_offload_dir needs enable_prefix_caching (blocks are named by their prefix-cache hash)")
    if not isinstance(kv_offload_bytes, int) or isinstance(kv_offload_bytes, bool) or kv_offload_bytes <= 0:
        raise ValueError(f"kv_offload_bytes must be a positive integer, got {kv_offload_bytes!r}")
    if swap_space is None:
        swap_space = DEFAULT_SWAP_SPACE if preemption_mode == "swap" or kv_offload_dir is not None else 0
    if isinstance(swap_space, bool) or not isinstance(swap_space, (int, float)) or not swap_space >= 0:
        raise ValueError(f"swap_space must be a number of GiB >= 0, got {swap_space!r}")
    return swap_space


def _model_path(model: str | None) -> str:
    if model is not None:
        return str(model)
    from fnllm.model.fetch import default_model_path

    return str(default_model_path())


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "float32",
        device: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        enable_chunked_prefill: bool = True,
        num_kv_blocks: int | None = None,
        kv_cache_memory: int | None = None,
        policy: str = "fcfs",
        long_prefill_token_threshold: int = 0,
        attn_backend: str | None = None,
        trace: str | None = None,
        swap_space: float | None = None,
        preemption_mode: str = "recompute",
        kv_offload_dir: str | None = None,
        kv_offload_bytes: int = DEFAULT_KV_OFFLOAD_BYTES,
    ) -> None:
        from fnllm.device.executor import ModelExecutor
        from fnllm.tokenizer import load_tokenizer

        path = _model_path(model)
        if num_kv_blocks is None and kv_cache_memory is None:
            kv_cache_memory = DEFAULT_KV_MEMORY
        if kv_cache_memory is not None and kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {kv_cache_memory!r}")
        CacheConfig(block_size=block_size, num_blocks=num_kv_blocks or 1)  # validate before loading anything
        swap_space = _tier_args(swap_space, preemption_mode, kv_offload_dir, kv_offload_bytes, enable_prefix_caching)
        self.tokenizer = load_tokenizer(path)
        executor = ModelExecutor(
            path, dtype=dtype, device=device, num_blocks=num_kv_blocks, kv_cache_bytes=None if num_kv_blocks else kv_cache_memory,
            block_size=block_size, seed=seed, attn_backend=attn_backend, swap_space_bytes=int(swap_space * (1 << 30)),
        )
        max_len = max_model_len or min(executor.max_position_embeddings, 4096)
        budget = max_num_batched_tokens or max(2048, 0 if enable_chunked_prefill else max_len)
        eos = tuple(sorted(set(executor.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        config = EngineConfig(
            model=ModelConfig(model=path, dtype=dtype, device=device, seed=seed, vocab_size=executor.vocab_size, eos_token_ids=eos),
            cache=CacheConfig(block_size=block_size, num_blocks=executor.num_blocks, enable_prefix_caching=enable_prefix_caching,
                              num_host_blocks=executor.num_host_blocks),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=max_len, policy=policy,
                enable_chunked_prefill=enable_chunked_prefill, long_prefill_token_threshold=long_prefill_token_threshold,
                preemption_mode=preemption_mode,
            ),
        )
        recorder = None
        if trace is not None:
            from fnllm.trace import TraceWriter

            recorder = TraceWriter(trace)
        offload = None
        if kv_offload_dir is not None:
            from fnllm.offload import open_offload

            offload = open_offload(executor, kv_offload_dir, kv_offload_bytes)
        self.llm_engine = LLMEngine(config, executor, self.tokenizer, recorder=recorder, kv_offload=offload)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; results in prompt order."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        ids = self._add_all(prompts, params, priority)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {"prompt_token_ids": self.tokenizer.apply_chat_template_ids(c, add_generation_prompt=add_generation_prompt),
             "prompt": self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)}
            for c in convs
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _add_all(self, prompts, params, priority) -> list[str]:
        engine, ids = self.llm_engine, []
        try:
            for k, (p, sp) in enumerate(zip(prompts, params)):
                rid = str(next(self._ids))
                engine.add_request(rid, p, sp, priority=priority[k] if priority else 0)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # one bad prompt: leave nothing of this call behind
            raise
        return ids

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine, done = self.llm_engine, {}
        bar = _progress(len(ids)) if use_tqdm else None
        t0, n_tokens = time.perf_counter(), 0
        wanted = set(ids)
        while engine.has_unfinished_requests() and len(done) < len(ids):
            for out in engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
                    n_tokens += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s")
        if bar is not None:
            bar.close()
        return [done[i] for i in ids]


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
