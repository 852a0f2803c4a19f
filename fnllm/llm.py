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

``tensor_parallel_size`` / ``pipeline_parallel_size`` spread the model over
worker processes (``distributed_executor_backend``: "uni", "mp" or "ray";
default "uni" for one rank, "mp" otherwise; see :mod:`fnllm.executor`); the
KV memory is then per rank.
``speculative_config`` (vLLM's dict: ``{"method": "ngram",
"num_speculative_tokens": k, "prompt_lookup_max": n, "prompt_lookup_min":
m}``) turns on n-gram speculative decoding (:mod:`fnllm.spec`); outputs are
the same as without it, and ``llm.llm_engine.spec_decode_stats()`` reports
the acceptance rate. ``LLM`` is a context manager, ``shutdown()``
stops its workers, and an atexit hook does so at interpreter exit.
"""

from __future__ import annotations

import atexit
import itertools
import time
import weakref
from typing import Sequence

import attrs

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig
from fnllm.engine import LLMEngine, PromptType
from fnllm.outputs import RequestOutput
from fnllm.state import RequestOutputKind, SamplingParams

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
        max_logprobs: int = 20,
        max_consecutive_failures: int = 3,
        swap_space: float | None = None,
        preemption_mode: str = "recompute",
        kv_offload_dir: str | None = None,
        kv_offload_bytes: int = DEFAULT_KV_OFFLOAD_BYTES,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        batch_invariant: bool = False,
        speculative_config: dict | None = None,
    ) -> None:
        from fnllm.executor import make_executor
        from fnllm.model.loader import open_checkpoint
        from fnllm.tokenizer import load_tokenizer

        path = _model_path(model)
        swap_space = _tier_args(swap_space, preemption_mode, kv_offload_dir, kv_offload_bytes, enable_prefix_caching)
        parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                                  distributed_executor_backend=distributed_executor_backend)
        ckpt = open_checkpoint(path)  # the checkpoint's config and index, no weights yet
        _check_layout(parallel, ckpt.config, swap_space, kv_offload_dir)
        if batch_invariant not in (True, False):
            raise ValueError(f"batch_invariant must be True or False, got {batch_invariant!r}")
        if batch_invariant and parallel.world_size > 1:
            raise ValueError("batch_invariant=True needs tensor_parallel_size=1 and pipeline_parallel_size=1")
        self.tokenizer = load_tokenizer(path)
        config = _engine_config(
            ckpt.config, self.tokenizer, path=path, dtype=dtype, device=device, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
            num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory, policy=policy,
            long_prefill_token_threshold=long_prefill_token_threshold, max_logprobs=max_logprobs,
            swap_space_bytes=int(swap_space * (1 << 30)), preemption_mode=preemption_mode, parallel=parallel,
            batch_invariant=bool(batch_invariant),
            speculative_config=speculative_config,
        )
        # every setting is valid: only now load the weights (in the workers, if any) and allocate the KV cache
        one_rank = dict(checkpoint=ckpt, num_host_blocks=config.cache.num_host_blocks) if parallel.backend == "uni" else {}
        if batch_invariant:
            one_rank["batch_invariant"] = True
        executor = make_executor(
            path, parallel, dtype=dtype, device=device, num_blocks=config.cache.num_blocks, block_size=block_size,
            seed=seed, attn_backend=attn_backend, **one_rank,
        )
        self._executor = executor
        atexit.register(_shutdown_at_exit, weakref.ref(self))
        recorder = None
        if trace is not None:
            from fnllm.trace import TraceWriter

            recorder = TraceWriter(trace)
        offload = None
        if kv_offload_dir is not None:
            from fnllm.offload import open_offload

            offload = open_offload(executor, kv_offload_dir, kv_offload_bytes)
        self.llm_engine = LLMEngine(
            config, executor, self.tokenizer, recorder=recorder, max_consecutive_failures=max_consecutive_failures,
            kv_offload=offload,
        )
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
        """Run every prompt to completion; results in prompt order. If the call
        is interrupted or fails, its requests are aborted (their KV freed)."""
        prompts = _prompt_list(prompts)
        if not prompts:
            return []
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params = list(sampling_params)
        else:
            params = [sampling_params or SamplingParams()] * len(prompts)
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"{len(priority)} priorities for {len(prompts)} prompts")
        ids = self._add_all(prompts, params, priority)
        try:
            return self._run(ids, use_tqdm)
        except BaseException:
            if self.llm_engine.dead is None:
                self.llm_engine.abort_request(ids)  # leave nothing of this call behind
            raise

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
                if isinstance(sp, SamplingParams):  # generate returns finished outputs only (as vLLM's LLM)
                    sp = attrs.evolve(sp, output_kind=RequestOutputKind.FINAL_ONLY)
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


def _prompt_list(prompts) -> list:
    """``prompts`` as a list of single prompts (a lone prompt is wrapped)."""
    if isinstance(prompts, (str, dict)) or (
        isinstance(prompts, (list, tuple)) and prompts and not isinstance(prompts[0], (str, dict, list, tuple))
    ):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(
            "prompts must be a string, a list of token ids, a dict, or a list of those; "
            f"got {type(prompts).__name__}"
        )
    return list(prompts)


def _engine_config(dcfg, tokenizer, *, path, dtype, device, seed, max_model_len, max_num_seqs, max_num_batched_tokens,
                   block_size, enable_prefix_caching, enable_chunked_prefill, num_kv_blocks, kv_cache_memory, policy,
                   long_prefill_token_threshold, max_logprobs, swap_space_bytes=0, preemption_mode="recompute",
                   parallel: ParallelConfig | None = None, batch_invariant: bool = False,
                   speculative_config: dict | None = None) -> EngineConfig:
    """The engine config for checkpoint config ``dcfg``: every setting checked
    (``ValueError`` naming it) before any weight is loaded."""
    from fnllm.device.executor import num_blocks_for_memory

    parallel = parallel or ParallelConfig()
    SpeculativeConfig.from_dict(speculative_config)  # checked before the KV sizing touches torch
    positions = dcfg.max_position_embeddings
    if max_model_len is not None and max_model_len > positions:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={positions}"
        )
    max_len = max_model_len or min(positions, 4096)
    CacheConfig(block_size=block_size)  # block_size first: the KV sizing below needs it
    num_blocks = _kv_blocks(dcfg, parallel, block_size, dtype, num_kv_blocks, kv_cache_memory)
    num_host_blocks = num_blocks_for_memory(swap_space_bytes, dcfg, block_size, dtype)  # the swap_space tier
    budget = max_num_batched_tokens or max(2048, max_num_seqs, 0 if enable_chunked_prefill else max_len)
    eos = tuple(sorted(set(dcfg.eos_token_ids) | set(tokenizer.eos_token_ids)))
    return EngineConfig(
        model=ModelConfig(model=path, dtype=dtype, device=device, seed=seed, vocab_size=dcfg.vocab_size,
                          eos_token_ids=eos, max_logprobs=max_logprobs, batch_invariant=batch_invariant),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching,
                          num_host_blocks=num_host_blocks, sliding_window=dcfg.sliding_window),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=max_len, policy=policy,
            enable_chunked_prefill=enable_chunked_prefill, long_prefill_token_threshold=long_prefill_token_threshold,
            preemption_mode=preemption_mode,
        ),
        parallel=parallel,
        speculative=speculative_config,
    )


def _check_layout(parallel: ParallelConfig, dcfg, swap_space: float, kv_offload_dir) -> None:
    """A parallel layout the model cannot take fails before anything loads; the
    host and disk KV tiers run on one rank only (the workers hold no host tier)."""
    if parallel.world_size == 1:
        return
    parallel.verify_with_model(num_heads=dcfg.num_heads, num_kv_heads=dcfg.num_kv_heads, num_layers=dcfg.num_layers,
                               intermediate_size=dcfg.intermediate_size)
    if swap_space or kv_offload_dir is not None:
        raise ValueError(
            "swap_space, preemption_mode='swap' and kv_offload_dir need tensor_parallel_size=1 and "
            "pipeline_parallel_size=1 (the host and disk KV tiers are not sharded across workers yet)"
        )


def _kv_blocks(dcfg, parallel: ParallelConfig, block_size: int, dtype: str, num_kv_blocks, kv_cache_memory) -> int:
    """Device KV blocks: ``num_kv_blocks``, or as many as ``kv_cache_memory`` bytes hold on every rank."""
    if num_kv_blocks is not None:
        if isinstance(num_kv_blocks, bool) or not isinstance(num_kv_blocks, int) or num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be an integer >= 1, got {num_kv_blocks!r}")
        return num_kv_blocks
    from fnllm.executor.base import rank_kv_block_bytes
    from fnllm.model.loader import torch_dtype

    memory = DEFAULT_KV_MEMORY if kv_cache_memory is None else kv_cache_memory
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {memory!r}")
    element = torch_dtype(dtype).itemsize
    blocks = memory // rank_kv_block_bytes(dcfg, parallel, block_size, element)
    if blocks < 1:
        raise ValueError(f"kv_cache_memory={memory} bytes is smaller than one KV block of {block_size} tokens")
    return blocks


def _shutdown_at_exit(ref) -> None:
    llm = ref()
    if llm is not None:
        llm.shutdown()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True)
