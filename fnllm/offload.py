"""The engine's glue for the disk KV tier (:mod:`fnllm.device.kv_disk`).

:class:`KVOffload` is called by :class:`~fnllm.engine.LLMEngine`: ``stage``
on add (reads a new request's prompt blocks that no tier holds from disk,
names them in the host tier through the pure core's ``stage_blocks`` and
fills those host blocks, all before the step that needs them; the engine
records the staging as a trace event), ``save`` after each step (hands the
prompt blocks the step completed to the background writer).
"""

from __future__ import annotations

from fnllm.device.kv_disk import DiskKV, model_fingerprint
from fnllm.lifecycle import stage_blocks


class KVOffload:
    """The engine's hooks for the disk tier (with the executor's host tier)."""

    def __init__(self, disk: DiskKV, executor) -> None:
        if executor.host_kv is None:
            raise ValueError("the disk KV tier needs a host tier (swap_space > 0)")
        self.disk, self.executor = disk, executor
        self._prompts: dict[str, tuple[tuple[bytes, ...], int]] = {}  # request -> (block hashes, prompt length)
        self.staged = 0  # blocks read from disk into the host tier

    def stage(self, state, request_id: str):
        """Read a new request's prompt blocks that no tier holds from disk into
        the host tier: (new state, first block, count)."""
        req = state.requests[request_id]
        hashes, plen = req.block_hashes, len(req.prompt_token_ids)
        self._prompts[request_id] = (hashes, plen)
        pool = state.pool
        first = 0
        while first < len(hashes) and (hashes[first] in pool.by_hash or hashes[first] in pool.host.by_hash):
            first += 1
        payloads = []
        for h in hashes[first : min((plen - 1) // pool.block_size, first + pool.host.num_free)]:
            kv = self.disk.read(h)
            if kv is None:
                break
            payloads.append(kv)
        if not payloads:
            return state, first, 0
        state, got = stage_blocks(state, request_id, first, len(payloads))
        for hb, kv in zip(got, payloads):
            self.executor.host_kv.write(hb, kv)
        self.staged += len(got)
        return state, first, len(got)

    def save(self, plan, state) -> None:
        """Queue the prompt blocks this step's plan completed (their KV is on the device now)."""
        bs = self.executor.block_size
        for rid, pos, toks, table in zip(plan.request_ids, plan.positions, plan.token_ids, plan.block_tables):
            entry = self._prompts.get(rid)
            if entry is None:
                continue
            hashes, plen = entry
            end = pos + len(toks)
            for j in range(pos // bs, min(end, plen) // bs):
                if j < len(hashes) and hashes[j] not in self.disk:
                    self.disk.submit(hashes[j], self.executor.host_kv.read_device_block(self.executor.kv_caches, table[j]))
            if end >= plen:
                del self._prompts[rid]
        if self._prompts:
            for rid in [r for r in self._prompts if r not in state.requests]:
                del self._prompts[rid]


def replay_stager(executor, directory: str):
    """For re-executing a trace with disk hits: a ``replay_steps`` hook that
    fills the host blocks a recorded ``stage`` event names with the same
    verified files of the disk tier under ``directory`` (read only), so the
    replay swaps in the bytes the recorded run did. ``ValueError`` naming the
    block when a file is gone or fails its checks."""
    cfg = executor.config
    shape = (cfg.num_layers, 2, executor.block_size, cfg.num_kv_heads, cfg.head_dim)
    if executor.host_kv is None:
        raise ValueError("replaying disk-tier reads needs an executor with a host tier (num_host_blocks > 0)")
    disk = DiskKV(str(directory), model_fingerprint(executor), 1 << 62, shape, executor.dtype)

    def fill(state, event, host_blocks) -> None:
        req = state.requests[event["request_id"]]
        for j, hb in enumerate(host_blocks, start=event["first"]):
            kv = disk.read(req.block_hashes[j])
            if kv is None:
                raise ValueError(f"block {j} of request {event['request_id']!r} ({req.block_hashes[j].hex()}) is no "
                                 f"longer in the disk tier under {directory}: the run cannot be re-executed")
            executor.host_kv.write(hb, kv)

    return fill


def open_offload(executor, directory: str, max_bytes: int) -> KVOffload:
    """The disk tier for ``executor``'s model under ``directory``."""
    cfg = executor.config
    shape = (cfg.num_layers, 2, executor.block_size, cfg.num_kv_heads, cfg.head_dim)
    disk = DiskKV(str(directory), model_fingerprint(executor), max_bytes, shape, executor.dtype)
    return KVOffload(disk, executor)
