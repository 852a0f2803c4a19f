"""Where a batch-1 decode step's time goes (``bench_latency.py --breakdown``).

Per timed decode step, medians over the steps, in ms:

- ``step``: one ``LLMEngine.step``;
- ``engine_rest``: the step outside ``ModelExecutor.execute`` (schedule,
  commit, detokenization, outputs);
- ``execute_rest``: ``execute`` outside ``forward`` (the host batch, sampling);
- ``forward_rest``: ``forward`` outside the layers (embedding, final norm,
  lm_head, the backend's ``prepare``);
- ``layers``: the decoder layers (the backend's one-call ``decode_layers``
  when it ran them; 0 when the step went layer by layer).

Then, in the same run, the memory-bound part on its own: the layers' linear
weights and the lm_head streamed through the backend's ``linear`` back to
back with one row, from cold caches (``linears_alone``, ``lm_head_alone``,
medians over ``passes`` sweeps) and their bytes, so ``layers - linears_alone`` is what the
layers spend beyond reading their weights (attention, norms, rope, KV writes,
and the caches those find cold after the weight stream).
Timers wrap the instance's methods for this phase only; they are removed after.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

PARTS = ("step", "engine_rest", "execute_rest", "forward_rest", "layers")


@contextmanager
def _timed(obj, name: str, spent: dict):
    """``obj.name`` adds its wall time to ``spent[name]`` while inside."""
    own = vars(obj).get(name)  # an instance attribute of that name, put back after
    inner = getattr(obj, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t

    setattr(obj, name, timed)
    try:
        yield
    finally:
        if own is None:
            delattr(obj, name)  # the class's method shows through again
        else:
            setattr(obj, name, own)


def step_parts(engine, prompts, tokens: int, params) -> dict:
    """Decode ``tokens`` tokens after each prompt; the medians of each part (ms)."""
    ex = engine.executor
    rows: dict[str, list[float]] = {p: [] for p in PARTS}
    spent: dict[str, float] = {}
    with _timed(ex, "execute", spent), _timed(ex, "forward", spent), _timed(ex.backend, "decode_layers", spent):
        for k, p in enumerate(prompts):
            engine.add_request(f"parts{k}", {"prompt_token_ids": p}, params)
            engine.step()  # the prompt
            while engine.has_unfinished_requests():
                spent.clear()
                t = time.perf_counter()
                engine.step()
                step = time.perf_counter() - t
                layers = spent.get("decode_layers", 0.0)
                for part, v in zip(PARTS, (step, step - spent["execute"], spent["execute"] - spent["forward"],
                                           spent["forward"] - layers, layers)):
                    rows[part].append(v)
    return {part: round(statistics.median(v) * 1e3, 3) for part, v in rows.items()}


@torch.inference_mode()
def weights_alone(ex, passes: int = 15) -> dict:
    """The layers' linear weights, then the lm_head, each streamed through the
    backend's one-row ``linear``: medians over ``passes`` (ms) and bytes."""
    *layer_ws, lm_head = ex.model.linear_weights()  # the layers' projections, then the lm_head

    evict = torch.rand(64 << 20, dtype=torch.bfloat16)  # 128 MiB, read before each sweep: no weight starts in cache

    def sweep(ws) -> float:
        evict.sum()
        t = time.perf_counter()
        for w in ws:
            ex.backend.linear(torch.ones(1, w.shape[1], dtype=w.dtype), w)
        return time.perf_counter() - t

    out = {}
    for name, ws in (("linears_alone", layer_ws), ("lm_head_alone", [lm_head])):
        out[name] = round(statistics.median(sweep(ws) for _ in range(passes)) * 1e3, 3)
        out[name.replace("alone", "bytes")] = sum(w.nbytes for w in ws)
    return out
