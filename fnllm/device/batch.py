"""Plan -> host batch: the flat arrays a forward needs, as numpy (no torch).

Rows keep the plan's order; row ``i``'s new tokens are the flat tokens
``query_start_loc[i] .. query_start_loc[i+1]-1`` at positions
``context_lens[i] .. seq_lens[i]-1``. A token at position ``p`` of row ``i``
lives in slot ``block_tables[i][p // block_size] * block_size + p % block_size``.
``block_tables`` is padded to a rectangle with block 0 (never read: every
read is bounded by ``seq_lens``). With a sliding window W, row ``i``'s
queries read keys from position ``max(0, context_lens[i] - W + 1)`` on, so
its blocks before ``first_blocks[i]`` are never read: there the plan may
hold :data:`~fnllm.state.HOLE` (-1), which stays in ``block_tables`` (a
backend must not index it); a hole at or after ``first_blocks[i]`` is a
``ValueError``. ``logits_indices`` holds the flat index of
the last token of each row that samples, in row order (``sample_rows``);
a row with ``d`` draft tokens (speculative decoding) has ``d + 1`` of them,
its last ``d + 1`` tokens in order, ``sample_offsets`` 0..d.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fnllm.state import HOLE, BatchPlan


@dataclass(frozen=True)
class HostBatch:
    block_size: int
    input_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]
    query_start_loc: np.ndarray  # int32 [B+1]
    query_lens: np.ndarray  # int32 [B]
    context_lens: np.ndarray  # int32 [B], tokens already cached before this step
    seq_lens: np.ndarray  # int32 [B], context_lens + query_lens
    block_tables: np.ndarray  # int32 [B, max_blocks]
    logits_indices: np.ndarray  # int64 [S]
    sample_rows: np.ndarray  # int64 [S]
    # offset j of each logits index within its row's draft window (0 without drafts)
    sample_offsets: np.ndarray | None = None  # int64 [S]
    first_blocks: np.ndarray | None = None  # int32 [B]: the first block each row reads (None: 0)
    sliding_window: int | None = None

    @property
    def read_start(self) -> np.ndarray:
        """int32 [B]: ``first_blocks`` (zeros without a window)."""
        return self.first_blocks if self.first_blocks is not None else np.zeros(self.num_rows, dtype=np.int32)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.query_lens.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return bool(self.num_rows) and int(self.query_lens.max()) == 1


def _block_table_array(tables, rows: int) -> np.ndarray:
    width = max((len(t) for t in tables), default=0)
    out = np.zeros((rows, max(width, 1)), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


def _check_bounds(positions: np.ndarray, tables: np.ndarray, num_blocks: int | None, max_positions: int | None) -> None:
    """Every position inside the rotary table, every block id inside the cache."""
    if max_positions is not None and positions.size and int(positions.max()) >= max_positions:
        raise ValueError(
            f"plan position {int(positions.max())} is outside the model's {max_positions} positions "
            "(max_position_embeddings)"
        )
    if num_blocks is not None and tables.size and (int(tables.min()) < 0 or int(tables.max()) >= num_blocks):
        bad = int(tables.min()) if int(tables.min()) < 0 else int(tables.max())
        raise ValueError(f"plan block id {bad} is outside the KV cache of {num_blocks} blocks")


def _check_holes(tables: np.ndarray, table_lens: np.ndarray, first: np.ndarray) -> np.ndarray:
    """``tables`` with the holes before each row's ``first`` block replaced by
    block 0, for the bounds check only; a hole a row reads is a ValueError."""
    cols = np.arange(tables.shape[1])[None, :]
    read = (cols >= first[:, None]) & (cols < table_lens[:, None])
    bad = np.argwhere(read & (tables == HOLE))
    if bad.size:
        i, j = (int(x) for x in bad[0])
        raise ValueError(f"plan row {i} reads a hole (block {j} of its table, from block {int(first[i])} on it reads)")
    return np.where(tables == HOLE, 0, tables)


def build_host_batch(
    plan: BatchPlan,
    block_size: int,
    vocab_size: int | None = None,
    *,
    num_blocks: int | None = None,
    max_positions: int | None = None,
    sliding_window: int | None = None,
) -> HostBatch:
    """Flatten ``plan``; raises ``ValueError`` on a plan that is not self-consistent,
    or (when the bounds are given) that addresses a block or position that does not exist."""
    rows = len(plan.token_ids)
    query_lens = np.fromiter((len(t) for t in plan.token_ids), dtype=np.int32, count=rows)
    if rows and int(query_lens.min()) < 1:
        raise ValueError(f"plan row {int(np.argmin(query_lens))} has no tokens")
    context_lens = np.asarray(plan.positions, dtype=np.int32).reshape(rows)
    if rows and int(context_lens.min()) < 0:
        raise ValueError(f"plan row {int(np.argmin(context_lens))} starts at a negative position")
    seq_lens = context_lens + query_lens
    table_lens = np.fromiter((len(t) for t in plan.block_tables), dtype=np.int32, count=rows)
    short = np.nonzero(table_lens * block_size < seq_lens)[0]
    if short.size:
        i = int(short[0])
        raise ValueError(f"plan row {i}: {seq_lens[i]} tokens need more blocks than its table's {table_lens[i]}")
    qsl = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(query_lens, out=qsl[1:])
    total = int(qsl[-1])
    input_ids = np.fromiter((t for ts in plan.token_ids for t in ts), dtype=np.int64, count=total)
    if vocab_size is not None and total and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"plan holds token ids outside the vocabulary [0, {vocab_size})")
    row_of = np.repeat(np.arange(rows), query_lens)
    positions = (np.arange(total) - qsl[:-1][row_of] + context_lens[row_of]).astype(np.int64)
    tables = _block_table_array(plan.block_tables, rows)
    first = None
    if sliding_window:
        first = (np.maximum(context_lens - sliding_window + 1, 0) // block_size).astype(np.int32)
    _check_bounds(positions, _check_holes(tables, table_lens, first if first is not None else np.zeros(rows, np.int32)),
                  num_blocks, max_positions)
    slot_mapping = tables[row_of, positions // block_size].astype(np.int64) * block_size + positions % block_size
    num_samples = np.asarray(plan.num_samples, dtype=np.int64).reshape(rows)
    sample_rows = np.nonzero(num_samples > 0)[0].astype(np.int64)
    logits_indices, offsets = (qsl[1:][sample_rows] - 1).astype(np.int64), None
    if any(plan.num_draft_tokens):
        sample_rows, logits_indices, offsets = _draft_windows(plan, sample_rows, qsl, query_lens)
    return HostBatch(
        block_size=block_size,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start_loc=qsl,
        query_lens=query_lens,
        context_lens=context_lens,
        seq_lens=seq_lens,
        block_tables=tables,
        logits_indices=logits_indices,
        sample_rows=sample_rows,
        first_blocks=first,
        sliding_window=sliding_window or None,
        sample_offsets=offsets,
    )


def _draft_windows(plan: BatchPlan, rows: np.ndarray, qsl: np.ndarray, query_lens: np.ndarray):
    """Sampling rows, logits indices and offsets when rows carry drafts."""
    drafts = np.asarray(plan.num_draft_tokens, dtype=np.int64)
    bad = np.nonzero((drafts < 0) | (drafts >= query_lens))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"plan row {i} has {int(drafts[i])} draft tokens among its {int(query_lens[i])} tokens")
    per = drafts[rows] + 1
    sample_rows = np.repeat(rows, per)
    offsets = np.arange(sample_rows.size, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    indices = (qsl[1:][sample_rows] - 1 - drafts[sample_rows] + offsets).astype(np.int64)
    return sample_rows.astype(np.int64), indices, offsets


def prompt_logprob_indices(plan: BatchPlan, batch: HostBatch) -> np.ndarray | None:
    """Flat indices of the positions whose logits give ``plan.prompt_targets``
    (row by row, in order), or None when the plan asks for none."""
    counts = [len(t) for t in plan.prompt_targets]
    if not any(counts):
        return None
    starts = batch.query_start_loc[:-1]
    return np.concatenate([np.arange(k, dtype=np.int64) + int(starts[i]) for i, k in enumerate(counts) if k])
