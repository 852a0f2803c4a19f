"""Engine configuration: frozen, validated at construction.

Every invalid value raises ``ValueError`` naming the field and the rule it
breaks, so a config that cannot work never reaches the scheduler. Pure: no
torch, no clock, no randomness.
"""

from __future__ import annotations

import attrs

POLICIES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "npu")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@attrs.frozen(kw_only=True)
class CacheConfig:
    """Paged KV cache: ``num_blocks`` device blocks of ``block_size`` tokens
    each, plus ``num_host_blocks`` host blocks (vLLM's ``swap_space``, counted
    in blocks by the shell) for swap preemption and the host prefix cache.
    ``sliding_window`` (the model's, e.g. Mistral's; None: full attention):
    a token attends to the last ``sliding_window`` positions only (itself
    included), so blocks wholly before every running sequence's window are
    released (holes in its table; :mod:`fnllm.blocks`)."""

    block_size: int = 16
    num_blocks: int = 1024
    enable_prefix_caching: bool = True
    num_host_blocks: int = 0
    sliding_window: int | None = None

    def __attrs_post_init__(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs <= 0 or bs & (bs - 1):
            raise ValueError(f"block_size must be a positive power of two, got {bs!r}")
        if not isinstance(self.num_blocks, int) or isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise ValueError(
                f"num_blocks must be >= 1 (zero KV memory cannot serve any request), got {self.num_blocks!r}"
            )
        h = self.num_host_blocks
        if not isinstance(h, int) or isinstance(h, bool) or h < 0:
            raise ValueError(f"num_host_blocks must be an integer >= 0, got {h!r}")
        w = self.sliding_window
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {w!r}")


@attrs.frozen(kw_only=True)
class SchedulerConfig:
    """Per-step budgets and admission policy (vLLM v1 scheduler semantics).

    ``long_prefill_token_threshold`` caps the tokens one prefill may take in a
    step (0 = no cap), so long prompts do not crowd out other admissions.
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 2048
    policy: str = "fcfs"
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    # vLLM's names: a preempted sequence's KV is dropped ("recompute") or
    # moved to host blocks ("swap"; recompute when the host tier is full)
    preemption_mode: str = "recompute"

    def __attrs_post_init__(self) -> None:
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_model_len", self.max_model_len)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}): every running sequence needs at least one token a step"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        t = self.long_prefill_token_threshold
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"long_prefill_token_threshold must be an integer >= 0, got {t!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off "
                f"({self.max_num_batched_tokens} < {self.max_model_len}): a long prompt could never be scheduled"
            )


@attrs.frozen(kw_only=True)
class ModelConfig:
    """What the core needs to know of the model (vocabulary, stop ids, the
    logprobs limit) plus what the device layer needs to build it (path,
    dtype, device, seed)."""

    model: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    vocab_size: int = 32000
    eos_token_ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    max_logprobs: int = 20  # the most logprobs a request may ask for (vLLM's name and default)
    # kernels whose reductions do not depend on the batch: a request's tokens are the
    # same alone or in any batch (fnllm.device.cpu_fused)
    batch_invariant: bool = False

    def __attrs_post_init__(self) -> None:
        _positive("max_logprobs", self.max_logprobs)
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant must be True or False, got {self.batch_invariant!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        _positive("vocab_size", self.vocab_size)
        for t in self.eos_token_ids:
            if not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise ValueError(f"eos_token_ids entry {t!r} is outside the vocabulary [0, {self.vocab_size})")


@attrs.frozen(kw_only=True)
class ParallelConfig:
    """How one model is spread over devices (vLLM's names): ``tensor_parallel_size``
    ranks split every layer, ``pipeline_parallel_size`` stages split the layers.
    ``distributed_executor_backend`` None picks "uni" for a world size of 1 and
    "mp" otherwise (:attr:`backend`)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None

    def __attrs_post_init__(self) -> None:
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("pipeline_parallel_size", self.pipeline_parallel_size)
        b = self.distributed_executor_backend
        if b is not None and b not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS} (or None), got {b!r}")
        if b == "uni" and self.world_size > 1:
            raise ValueError(
                f"distributed_executor_backend 'uni' runs one process; a world size of {self.world_size} "
                "(tensor_parallel_size x pipeline_parallel_size) needs 'mp' or 'ray'"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def backend(self) -> str:
        return self.distributed_executor_backend or ("uni" if self.world_size == 1 else "mp")

    def verify_with_model(self, *, num_heads: int, num_kv_heads: int, num_layers: int, intermediate_size: int) -> None:
        """Raise ``ValueError`` when the model's shape cannot be split this way.
        KV heads are replicated when ``tensor_parallel_size > num_kv_heads`` (as vLLM does)."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if num_heads % tp:
            raise ValueError(f"the model's {num_heads} attention heads are not divisible by tensor_parallel_size {tp}")
        if tp <= num_kv_heads and num_kv_heads % tp:
            raise ValueError(f"the model's {num_kv_heads} KV heads are not divisible by tensor_parallel_size {tp}")
        if tp > num_kv_heads and tp % num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp} exceeds the model's {num_kv_heads} KV heads and is not a multiple "
                "of them (each KV head must be replicated the same number of times)"
            )
        if intermediate_size % tp:
            raise ValueError(f"the model's intermediate size {intermediate_size} is not divisible by tensor_parallel_size {tp}")
        if num_layers < pp:
            raise ValueError(f"pipeline_parallel_size {pp} exceeds the model's {num_layers} layers (each stage needs one)")


SPEC_METHODS = ("ngram",)
SPEC_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size")


@attrs.frozen(kw_only=True)
class SpeculativeConfig:
    """N-gram speculative decoding (prompt lookup), with vLLM's names: each
    decode step proposes up to ``num_speculative_tokens`` tokens that followed
    the most recent earlier occurrence of the sequence's last ``n`` tokens,
    ``prompt_lookup_max >= n >= prompt_lookup_min``, longest ``n`` first.
    As in vLLM, a missing ``prompt_lookup_min``/``max`` takes the other's
    value, and both default to 5 (see :meth:`from_dict`).
    ``disable_by_batch_size`` (vLLM's name): no drafts in a step that runs at
    least this many sequences (where verifying drafts costs more compute
    than it saves); None: always speculate."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    disable_by_batch_size: int | None = None

    def __attrs_post_init__(self) -> None:
        if self.disable_by_batch_size is not None:
            _positive("speculative_config disable_by_batch_size", self.disable_by_batch_size)
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config method must be one of {SPEC_METHODS}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            _positive(f"speculative_config {name}", getattr(self, name))
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @classmethod
    def from_dict(cls, d) -> "SpeculativeConfig | None":
        """Build from vLLM's ``speculative_config`` dict (None or {} -> None);
        ``ValueError`` naming an unknown key or a bad value."""
        if d is None or isinstance(d, SpeculativeConfig):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}")
        if not d:
            return None
        unknown = sorted(set(d) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"speculative_config has unknown key(s) {unknown}; known: {list(SPEC_KEYS)}")
        if "method" not in d or "num_speculative_tokens" not in d:
            raise ValueError("speculative_config needs 'method' (\"ngram\") and 'num_speculative_tokens'")
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = 5
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        return cls(method=d["method"], num_speculative_tokens=d["num_speculative_tokens"],
                   prompt_lookup_max=hi, prompt_lookup_min=lo, disable_by_batch_size=d.get("disable_by_batch_size"))


@attrs.frozen(kw_only=True)
class EngineConfig:
    model: ModelConfig = attrs.field(factory=ModelConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    parallel: ParallelConfig = attrs.field(factory=ParallelConfig)
    # n-gram speculative decoding; None = off
    speculative: SpeculativeConfig | None = attrs.field(default=None, converter=SpeculativeConfig.from_dict)

    def __attrs_post_init__(self) -> None:
        if (
            not self.scheduler.enable_chunked_prefill
            and self.scheduler.max_num_batched_tokens < self.cache.block_size
        ):
            raise ValueError(
                "max_num_batched_tokens must be >= block_size when chunked prefill is off "
                f"({self.scheduler.max_num_batched_tokens} < {self.cache.block_size})"
            )
