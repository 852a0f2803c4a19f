"""``LLM``: the offline API, with vLLM's names.

``LLM(model=...)`` loads a Hugging Face directory or a ``.gguf`` file (the
demo SmolLM2 model when ``model`` is None), sizes the KV cache from
``num_kv_blocks`` or ``kv_cache_memory`` (bytes), and serves ``generate``
and ``chat`` through an :class:`~fnllm.engine.LLMEngine`.

``tensor_parallel_size`` / ``pipeline_parallel_size`` spread the model over
worker processes (``distributed_executor_backend``: "uni", "mp" or "ray";
default "uni" for one rank, "mp" otherwise; see :mod:`fnllm.executor`); the
KV memory is then per rank. ``LLM`` is a context manager, ``shutdown()``
stops its workers, and an atexit hook does so at interpreter exit.
"""

from __future__ import annotations

import atexit
import itertools
import time
import weakref
from typing import Sequence

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from fnllm.engine import LLMEngine, PromptType
from fnllm.outputs import RequestOutput
from fnllm.state import SamplingParams

DEFAULT_KV_MEMORY = 1 << 30  # 1 GiB


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
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
    ) -> None:
        from fnllm.executor import make_executor
        from fnllm.tokenizer import load_tokenizer

        path = _model_path(model)
        if num_kv_blocks is None and kv_cache_memory is None:
            kv_cache_memory = DEFAULT_KV_MEMORY
        if kv_cache_memory is not None and kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {kv_cache_memory!r}")
        CacheConfig(block_size=block_size, num_blocks=num_kv_blocks or 1)  # validate before loading anything
        parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                                  distributed_executor_backend=distributed_executor_backend)
        if parallel.world_size > 1:  # a layout the model cannot take fails before anything is loaded
            from fnllm.model.loader import load_config

            c = load_config(path)
            parallel.verify_with_model(num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, num_layers=c.num_layers,
                                       intermediate_size=c.intermediate_size)
        self.tokenizer = load_tokenizer(path)
        executor = make_executor(
            path, parallel, dtype=dtype, device=device, num_blocks=num_kv_blocks,
            kv_cache_bytes=None if num_kv_blocks else kv_cache_memory, block_size=block_size, seed=seed,
            attn_backend=attn_backend,
        )
        self._executor = executor
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        max_len = max_model_len or min(executor.max_position_embeddings, 4096)
        budget = max_num_batched_tokens or max(2048, 0 if enable_chunked_prefill else max_len)
        eos = tuple(sorted(set(executor.eos_token_ids) | set(self.tokenizer.eos_token_ids)))
        config = EngineConfig(
            model=ModelConfig(model=path, dtype=dtype, device=device, seed=seed, vocab_size=executor.vocab_size, eos_token_ids=eos),
            cache=CacheConfig(block_size=block_size, num_blocks=executor.num_blocks, enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=max_len, policy=policy,
                enable_chunked_prefill=enable_chunked_prefill, long_prefill_token_threshold=long_prefill_token_threshold,
            ),
            parallel=parallel,
        )
        recorder = None
        if trace is not None:
            from fnllm.trace import TraceWriter

            recorder = TraceWriter(trace)
        self.llm_engine = LLMEngine(config, executor, self.tokenizer, recorder=recorder)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def shutdown(self) -> None:
        """Stop the workers and free the model (idempotent)."""
        executor, self._executor = getattr(self, "_executor", None), None
        if executor is not None:
            executor.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

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


def _shutdown_at_exit(ref) -> None:
    llm = ref()
    if llm is not None:
        llm.shutdown()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
