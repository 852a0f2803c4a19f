"""The executor: runs a :class:`BatchPlan` as one forward over paged KV.

:class:`ModelExecutor` owns the weights and one KV tensor per layer,
``(2, num_blocks, block_size, num_kv_heads, head_size)`` as vllm-ascend lays
it out, and (with ``num_host_blocks``) a host tier of the same layout
(:mod:`fnllm.device.kv_tiers`). A step: the plan's swaps and block copies
(``plan.swap_out``, ``plan.swap_in``, ``plan.copies``, all layers, before
anything else), plan -> host batch (pure, :mod:`fnllm.device.batch`) -> backend
metadata, the forward (logits only for rows that sample, and for the prompt
positions whose logprobs the plan asks for), then sampling. It
keeps no per-request state: everything a step needs is in its plan (the
penalties' token counts are memoized by the identity of the plan's immutable
values, :class:`~fnllm.device.penalties.CountMemo`: a cache, never a source).

As one rank of a parallel model (``shard`` and ``groups``, built by
:class:`fnllm.device.worker.Worker`) it holds only its shard of the weights
and of the KV cache (its KV heads, its layers); a later pipeline stage
receives the hidden states from the one before, and only the output rank (TP
rank 0 of the last stage) samples: the others' ``execute`` returns None.
"""

from __future__ import annotations

import dataclasses
import os
from itertools import chain

import numpy as np
import torch

from fnllm.device.attention import get_attn_backend, resolve_device
from fnllm.device.batch import HostBatch, build_host_batch, prompt_logprob_indices
from fnllm.device.huge_pages import move_to_huge_pages
from fnllm.device.kv_memory import populate, zeros_lazy
from fnllm.device.kv_tiers import HostKV, host_blocks_for_memory
from fnllm.device.penalties import CountMemo
from fnllm.device.sampling import SampleRequest, prompt_logprobs, sample
from fnllm.model.loader import Checkpoint, load_model, open_checkpoint, torch_dtype
from fnllm.model.model_config import DecoderConfig, ModelFacts
from fnllm.model.parallel import local_config
from fnllm.state import BatchPlan, Executor, StepOutput

__all__ = ["Executor", "ModelExecutor", "num_blocks_for_memory"]


def num_blocks_for_memory(memory_bytes: int, model_config: DecoderConfig, block_size: int, dtype="float32") -> int:
    """How many KV blocks fit in ``memory_bytes`` (all layers, K and V)."""
    element = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    return int(memory_bytes) // model_config.kv_block_bytes(block_size, element)


class ModelExecutor(ModelFacts):
    """Weights + paged KV cache + sampler for one model.

    ``model_path`` is a Hugging Face directory or a ``.gguf`` file. Give
    either ``num_blocks`` or ``kv_cache_bytes``. ``device`` is ``auto``
    (npu, then cuda, then cpu), ``cpu``, ``cuda`` or ``npu``;
    ``attn_backend`` None picks the device's backend.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str = "float32",
        device: str = "auto",
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        block_size: int = 16,
        seed: int = 0,
        attn_backend: str | None = None,
        checkpoint=None,
        num_host_blocks: int | None = None,
        swap_space_bytes: int = 0,
        shard=None,
        groups=None,
        batch_invariant: bool = False,
    ):
        # validates before anything is allocated (``checkpoint``, or a Checkpoint as
        # ``model_path``: already opened by the caller)
        if checkpoint is None and isinstance(model_path, Checkpoint):
            checkpoint = model_path
        ckpt = checkpoint if checkpoint is not None else open_checkpoint(model_path)
        self.config: DecoderConfig = ckpt.config
        self.model_path = ckpt.path
        self.gguf_path = ckpt.gguf_path
        self.block_size, self.seed = block_size, seed
        self.dtype = torch_dtype(dtype)
        self.device = resolve_device(device)
        if num_blocks is None:
            if kv_cache_bytes is None:
                raise ValueError("give num_blocks or kv_cache_bytes")
            num_blocks = num_blocks_for_memory(kv_cache_bytes, self.config, block_size, self.dtype)
        if num_blocks < 1:
            raise ValueError(f"KV cache memory holds no block of {block_size} tokens (num_blocks={num_blocks})")
        self.num_blocks = num_blocks
        self.shard, self.groups = shard, groups
        if groups is not None:
            self.device = groups.device
        local = local_config(self.config, shard) if shard is not None else self.config  # the rank's heads, layers
        self.batch_invariant = batch_invariant
        self.backend = get_attn_backend(self.device, attn_backend, cfg=local, block_size=block_size, dtype=self.dtype,
                                        batch_invariant=batch_invariant)
        self.weight_bytes_in_huge_pages = 0
        self.model, _ = load_model(ckpt, dtype=self.dtype, device=self.device, shard=shard, groups=groups,
                                   place=self._place_weights)
        if self._repacks_linears(self.model):
            self.model.repack_linears(self.backend.pack_weight)
        elif self.backend.packs_linears:  # the model keeps its plain weights, the backend packed copies
            lazy = os.environ.get("FNLLM_PACK_LINEAR") == "lazy"
            self.backend.hold_packed(self.model.linear_weights(), lazy=lazy)
        shape = (2, num_blocks, block_size, local.num_kv_heads, local.head_dim)
        self.kv_caches = [zeros_lazy(shape, self.dtype, self.device) for _ in range(local.num_layers)]
        if num_host_blocks is None:
            element = torch.empty((), dtype=self.dtype).element_size()
            num_host_blocks = host_blocks_for_memory(swap_space_bytes, local.kv_block_bytes(block_size, element))
        self.num_host_blocks = num_host_blocks
        self.host_kv = HostKV(num_host_blocks, self.kv_caches) if num_host_blocks else None
        self._counts = CountMemo()  # penalties' token counts, derived from plan data only

    def _repacks_linears(self, model) -> bool:
        """Whether the backend replaces the model's linears by packed copies (too
        many bytes to keep the plain ones beside them)."""
        return self.backend.packs_linears and not self.backend.keeps_row_major(model.linear_bytes())

    def _place_weights(self, model) -> None:
        """Before the checkpoint fills them, on CPU: the weights into 2 MiB pages
        (:mod:`fnllm.device.huge_pages`; a decode step streams them all), unless the
        backend is to replace the linears by packed copies."""
        if self.device.type == "cpu" and not self._repacks_linears(model):
            self.weight_bytes_in_huge_pages = move_to_huge_pages(chain(model.parameters(), model.buffers()))

    def populate_kv(self) -> bool:
        """Map the KV cache's host pages now (:func:`fnllm.device.kv_memory.populate`):
        later steps pay no first-touch page faults. False where unsupported."""
        return populate(self.kv_caches)

    @classmethod
    def from_engine_config(cls, config, *, attn_backend: str | None = None) -> "ModelExecutor":
        """Build from an :class:`fnllm.config.EngineConfig`."""
        m, c = config.model, config.cache
        if m.model is None:
            raise ValueError("EngineConfig.model.model (the model path) is not set")
        return cls(m.model, dtype=m.dtype, device=m.device, num_blocks=c.num_blocks, block_size=c.block_size,
                   seed=m.seed, attn_backend=attn_backend, num_host_blocks=c.num_host_blocks,
                   batch_invariant=m.batch_invariant)

    # -- a step --------------------------------------------------------------------

    def _guided_rows(self):
        """The grammar matchers of guided rows (built on first use: xgrammar and the tokenizer load lazily)."""
        rows = getattr(self, "_guided", None)
        if rows is None:
            from fnllm.device.guided import GuidedRows
            from fnllm.guided import compiler_for_model

            source = str(self.gguf_path or self.model_path)
            rows = self._guided = GuidedRows(compiler_for_model(source, self.vocab_size))
        return rows

    def move_blocks(self, plan: BatchPlan) -> None:
        """The plan's tier moves (swap_out, then swap_in), then its copies."""
        if plan.swap_out or plan.swap_in:
            if self.host_kv is None:
                raise ValueError("the plan moves blocks between tiers but this executor has no host tier")
            self.host_kv.apply(self.kv_caches, plan.swap_out, plan.swap_in)
        self.copy_blocks(plan.copies)

    @torch.inference_mode()
    def copy_blocks(self, copies) -> None:
        if not copies:
            return
        flat = [b for pair in copies for b in pair]
        if min(flat) < 0 or max(flat) >= self.num_blocks:
            raise ValueError(f"block copy {copies} addresses a block outside the KV cache of {self.num_blocks}")
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for cache in self.kv_caches:
            cache[:, dst] = cache[:, src]

    def _host_batch(self, plan: BatchPlan) -> HostBatch:
        return build_host_batch(plan, self.block_size, self.vocab_size, num_blocks=self.num_blocks,
                                max_positions=self.max_position_embeddings, sliding_window=self.config.sliding_window)

    @torch.inference_mode()
    def forward(self, batch: HostBatch) -> torch.Tensor | None:
        """The logits ``[len(batch.sample_rows), vocab]``, in the model's dtype
        (None on a rank that does not sample)."""
        meta = self.backend.prepare(batch, self.model.cos_sin_cache)
        input_ids = torch.from_numpy(batch.input_ids).to(self.device)
        logits_indices = torch.from_numpy(batch.logits_indices).to(self.device)
        if self.shard is None:
            return self.model(input_ids, self.kv_caches, meta, self.backend, logits_indices)
        from fnllm.distributed import pp_recv, pp_send

        hidden = None
        if not self.shard.is_first:
            hidden = pp_recv((batch.num_tokens, self.config.hidden_size), self.dtype, 2, self.groups)
        out = self.model(input_ids, self.kv_caches, meta, self.backend, logits_indices, hidden)
        if not self.shard.is_last:
            pp_send(list(out), self.groups)
            return None
        return out

    def compute_logits(self, plan: BatchPlan) -> torch.Tensor | None:
        """Run ``plan`` (copies and KV writes included) and return the logits of
        its sampling rows, in row order (float32), without sampling."""
        self.move_blocks(plan)
        if not len(plan):
            return torch.empty((0, self.vocab_size))
        logits = self.forward(self._host_batch(plan))
        return None if logits is None else logits.float()

    def execute(self, plan: BatchPlan) -> StepOutput | None:
        self.move_blocks(plan)
        if not len(plan):
            return StepOutput(sampled=())
        batch = self._host_batch(plan)
        plp_index = prompt_logprob_indices(plan, batch) if plan.prompt_targets else None
        if plp_index is not None:  # logits of the prompt positions too, after the sampling rows'
            batch = dataclasses.replace(batch, logits_indices=np.concatenate([batch.logits_indices, plp_index]))
        logits = self.forward(batch)
        if logits is None:
            return None
        prompt_lps = None
        if plp_index is not None:
            n_plp = len(plp_index)
            logits, plp_logits = logits[: len(logits) - n_plp], logits[len(logits) - n_plp :]
            with torch.inference_mode():
                prompt_lps = prompt_logprobs(plp_logits, plan)
        rows = batch.sample_rows.tolist()
        offsets = [0] * len(rows) if batch.sample_offsets is None else batch.sample_offsets.tolist()
        hist = plan.history
        # a draft window's position j samples as output position output_pos + j (fnllm.spec)
        reqs = [
            SampleRequest(plan.sampling[i], plan.num_samples[i], plan.sample_index[i], plan.output_pos[i] + j,
                          plan.request_ids[i] if plan.request_ids else "", hist[i] if hist else ())
            for i, j in zip(rows, offsets)
        ]
        with torch.inference_mode():
            if plan.guided_outputs and rows:  # the grammar's token bitmask, before any sampling
                self._guided_rows().apply(plan, rows, logits)
            got, lps = sample(logits, reqs, self.seed, self._counts) if rows else ((), None)
        self._counts.end_step()
        sampled = [()] * len(plan)
        for i, s in zip(rows, got):
            sampled[i] = sampled[i] + s
        logprobs = None
        if lps is not None:
            logprobs = [()] * len(plan)
            for i, lp in zip(rows, lps):
                logprobs[i] = logprobs[i] + lp
            logprobs = tuple(logprobs)
        return StepOutput(sampled=tuple(sampled), logprobs=logprobs, prompt_logprobs=prompt_lps)
