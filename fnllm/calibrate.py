"""``fnllm calibrate``: time real steps on this device, fit the linear cost model.

It loads the model exactly as ``LLM(model, dtype=..., device=...)`` does with
its defaults (1 GiB of KV cache, block size 16, budget, max_num_seqs), times
a grid of hand-built plans through :class:`~fnllm.device.executor.ModelExecutor`
(decode batches x context lengths, prefill chunks at several offsets, mixed
batches; the KV cache's pages mapped first, ``populate_kv``), takes the
median of ``repeats`` timings per shape, and fits :mod:`fnllm.sim.cost`'s
linear terms and token curve (the step's time by its token count, at the
grid's sizes) by non-negative least squares. The
engine's own per-step work (schedule, commit, output bookkeeping: pure
Python) is timed separately with the simulator's executor and added to the
``step`` and ``sample`` terms, so a simulated step costs what a served one
does. Prints every shape's measured and fitted time and the fit error;
writes the cost file with the model's shape and its default EngineConfig.
Lives outside ``fnllm.sim`` because it needs torch and the device.
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np

from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fnllm.sim.cost import FEATURES, TERM_OF, CostModel, curve_at, features
from fnllm.state import BatchPlan, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def default_config(executor, eos_extra=(), *, path: str, dtype: str, device: str) -> EngineConfig:
    """The EngineConfig ``LLM(path, dtype=dtype, device=device)`` builds with its defaults
    (mirrors fnllm/llm.py; the benchmark checks the two agree on the demo model)."""
    max_len = min(executor.max_position_embeddings, 4096)
    eos = tuple(sorted(set(executor.eos_token_ids) | set(eos_extra)))
    return EngineConfig(
        model=ModelConfig(model=path, dtype=dtype, device=device, seed=0, vocab_size=executor.vocab_size, eos_token_ids=eos),
        cache=CacheConfig(block_size=executor.block_size, num_blocks=executor.num_blocks, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_batched_tokens=max(2048, 0), max_num_seqs=64, max_model_len=max_len),
    )


class _Blocks:
    """Hands out block ids round-robin (contents do not matter for timing)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.n, self.bs, self.next = num_blocks, block_size, 0

    def table(self, tokens: int) -> tuple[int, ...]:
        k = -(-tokens // self.bs)
        out = tuple((self.next + i) % self.n for i in range(k))
        self.next = (self.next + k) % self.n
        return out


def make_plan(rows: list[tuple[int, int, bool]], blocks: _Blocks, vocab: int) -> BatchPlan:
    """Rows of (new tokens, start position, samples?) as a plan."""
    tok = 3 % vocab
    cols = {"token_ids": [], "positions": [], "block_tables": [], "num_samples": []}
    for n, pos, samples in rows:
        cols["token_ids"].append((tok,) * n)
        cols["positions"].append(pos)
        cols["block_tables"].append(blocks.table(pos + n))
        cols["num_samples"].append(1 if samples else 0)
    k = len(rows)
    return BatchPlan(step=0, seq_ids=tuple(range(k)), request_ids=tuple(f"c{i}" for i in range(k)),
                     token_ids=tuple(cols["token_ids"]), positions=tuple(cols["positions"]),
                     block_tables=tuple(cols["block_tables"]), num_samples=tuple(cols["num_samples"]),
                     sample_index=(0,) * k, output_pos=tuple(cols["positions"]), sampling=(GREEDY,) * k)


def grid(kind: str, capacity: int, max_len: int) -> list[list[tuple[int, int, bool]]]:
    """Step shapes: decode batches x contexts, prefill chunks x offsets, mixed."""
    if kind == "quick":
        decode = [(b, c) for b in (1, 8) for c in (16, 64)]
        prefill = [(n, 0) for n in (16, 64)] + [(32, 32)]
        mixed = [(4, 32, 32)]
    else:
        decode = [(b, c) for b in (1, 2, 4, 8, 16, 32, 64) for c in (32, 256, 1024)]
        prefill = [(n, 0) for n in (16, 64, 256, 512, 1024)] + [(256, 512), (256, 1536), (512, 1024)]
        mixed = [(16, 256, 128), (32, 256, 256), (48, 512, 512), (8, 1024, 256)]
    shapes = []
    for b, c in decode:
        if b * (c + 1) <= capacity and c < max_len:
            shapes.append([(1, c, True)] * b)
    for n, pos in prefill:
        if pos + n <= min(capacity, max_len):
            shapes.append([(n, pos, True)])
    for b, c, n in mixed:
        if b * (c + 1) + n <= capacity and c < max_len and n <= max_len:
            shapes.append([(1, c, True)] * b + [(n, 0, True)])
    if kind != "quick" and 4 * 128 <= capacity:
        shapes.append([(128, 0, True)] * 4)
    return shapes


def time_plans(executor, plans: list[BatchPlan], repeats: int, timer=time.perf_counter) -> list[float]:
    """Each plan's median time over ``repeats`` rounds. A round times every
    plan once, in grid order, so a slow drift of the machine's speed (a shared
    host's memory bandwidth) spreads over all shapes instead of biasing the
    ones timed while it lasted."""
    for plan in plans:
        executor.execute(plan)  # warm-up
    ts: list[list[float]] = [[] for _ in plans]
    for _ in range(repeats):
        for i, plan in enumerate(plans):
            t = timer()
            executor.execute(plan)
            ts[i].append(timer() - t)
    return [statistics.median(t) for t in ts]


def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares by active set (Lawson-Hanson), relative
    error weighting done by the caller. Small problems only."""
    m, n = a.shape
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(3 * n):
        w = a.T @ (b - a @ x)
        if passive.all() or (w[~passive] <= 1e-12 * max(1.0, abs(w).max())).all():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg] + 1e-300))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


def curve_knots(tokens: list[int], ratio: float = 1.5) -> list[int]:
    """The token counts the curve is fitted at: the grid's own sizes, each at
    least ``ratio`` times the one before (so that every segment has data)."""
    knots: list[int] = []
    for t in sorted(set(tokens)):
        if not knots or t >= ratio * knots[-1]:
            knots.append(t)
    return knots


def fit(feats: list[dict], times: list[float]) -> tuple[dict, list]:
    """The linear terms (seconds per unit) and the token curve ``[[tokens,
    seconds], ...]`` minimising relative squared error. The curve's value at
    each knot is a non-negative unknown (its basis: each knot's weight in the
    linear interpolation, :func:`fnllm.sim.cost.curve_at`); it carries the
    step's fixed cost too (every step has a token), so there is no fitted
    ``step`` term."""
    knots = curve_knots([f["tokens"] for f in feats])
    unit = [[[k, float(i == j)] for i, k in enumerate(knots)] for j in range(len(knots))]
    terms = list(FEATURES[1:4])  # sampled rows, prefill pairs, decode context (copies/swaps are not timed)
    a = np.array([[curve_at(u, f["tokens"]) for u in unit] + [float(f[k]) for k in terms] for f in feats])
    y = np.array(times)
    w = 1.0 / y  # relative error: every shape counts, small ones too
    scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
    x = nnls(a * w[:, None] / scale, y * w) / scale
    coef = {"step": 0.0, "token": 0.0} | {TERM_OF[k]: float(v) for k, v in zip(terms, x[len(knots):])}
    return coef, [[k, float(v)] for k, v in zip(knots, x[: len(knots)])]


def shell_overhead(config: EngineConfig, timer=time.perf_counter) -> tuple[float, float]:
    """Seconds per engine step and per sampled row that the engine itself
    (schedule, commit, outputs) spends, measured with the SimExecutor."""
    from fnllm.engine import LLMEngine
    from fnllm.sim.executor import SimExecutor, filler_token

    res = []
    for b in (1, 32):
        ex = SimExecutor(filler_token(config.model.vocab_size, config.model.eos_token_ids))
        engine = LLMEngine(config, ex, None, clock=lambda: 0.0)
        for i in range(b):
            engine.add_request(f"s{i}", [5 + i % 50] * 16, SamplingParams(max_tokens=80, ignore_eos=True))
        for _ in range(5):
            engine.step()
        t, n = timer(), 50
        for _ in range(n):
            engine.step()
        res.append((timer() - t) / n)
    per_row = max(0.0, (res[1] - res[0]) / 31)
    return max(0.0, res[0] - per_row), per_row


def calibrate(model: str | None, *, dtype: str = "float32", device: str = "auto", out: str, grid_kind: str = "standard",
              repeats: int = 3, log=print, timer=time.perf_counter) -> CostModel:
    """See the module docstring. ``timer``: wall clock by default; the
    validation benchmark can pass ``time.process_time`` on a shared machine."""
    from fnllm.device.executor import ModelExecutor
    from fnllm.llm import DEFAULT_KV_MEMORY, _model_path
    from fnllm.trace import config_to_json

    path = _model_path(model)
    executor = ModelExecutor(path, dtype=dtype, device=device, kv_cache_bytes=DEFAULT_KV_MEMORY, block_size=16)
    try:
        from fnllm.tokenizer import load_tokenizer

        eos_extra = load_tokenizer(path).eos_token_ids
    except Exception:  # a checkpoint without a tokenizer (the tests' tiny ones): the model's EOS ids only
        eos_extra = ()
    config = default_config(executor, eos_extra, path=path, dtype=dtype, device=device)
    blocks = _Blocks(executor.num_blocks, executor.block_size)
    capacity = int(executor.num_blocks * executor.block_size * 0.9)
    plans = [make_plan(rows, blocks, executor.vocab_size) for rows in grid(grid_kind, capacity, config.scheduler.max_model_len)]
    executor.populate_kv()  # steps are timed as a warm server runs them: no first-touch page faults
    log(f"calibrating {path} ({dtype}, {executor.device}) on {len(plans)} step shapes x {repeats} repeats ...")
    times = time_plans(executor, plans, repeats, timer)
    feats = [features(p) for p in plans]
    coef, curve = fit(feats, times)
    shell_step, shell_row = shell_overhead(config, timer)
    cost0 = CostModel(coefficients=coef, token_curve=curve)
    errs = []
    log(f"{'rows':>5} {'tokens':>6} {'decode ctx':>10} {'measured ms':>11} {'fitted ms':>9} {'error':>7}")
    for p, f, t in zip(plans, feats, times):
        pred = cost0.step_seconds(p)
        errs.append((pred - t) / t)
        log(f"{len(p):>5} {f['tokens']:>6} {f['decode_context']:>10} {t * 1e3:>11.2f} {pred * 1e3:>9.2f} {errs[-1] * 100:>6.1f}%")
    mean_abs = sum(abs(e) for e in errs) / len(errs)
    worst = max(abs(e) for e in errs)
    log(f"fit error: mean |relative error| {mean_abs * 100:.1f}%, worst {worst * 100:.1f}%")
    log(f"engine shell (schedule, commit, outputs): {shell_step * 1e6:.0f} us per step + {shell_row * 1e6:.1f} us per row")
    coef = dict(coef, step=coef["step"] + shell_step, sample=coef["sample"] + shell_row, copy=0.0, swap=0.0)
    mc = executor.config
    n_params = sum(p.numel() for p in executor.model.parameters())
    cost = CostModel(
        kind="linear", coefficients=coef, token_curve=curve, config=config_to_json(config),
        model={"name": str(path), "num_layers": mc.num_layers, "hidden_size": mc.hidden_size,
               "intermediate_size": mc.intermediate_size, "num_heads": mc.num_heads, "num_kv_heads": mc.num_kv_heads,
               "head_dim": mc.head_dim, "vocab_size": mc.vocab_size, "num_params": int(n_params),
               "act_bytes": executor.kv_caches[0].element_size()},
        meta={"source": "fnllm calibrate", "model": str(path), "dtype": dtype, "device": str(executor.device),
              "machine": f"{platform.machine()} {platform.processor() or ''} ({platform.node()})".strip(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "grid": grid_kind, "repeats": repeats,
              "fit_mean_abs_rel_error": round(mean_abs, 4), "fit_worst_abs_rel_error": round(worst, 4),
              "shell_step_s": shell_step, "shell_row_s": shell_row,
              "samples": [dict(f, seconds=t) for f, t in zip(feats, times)]},
    )
    cost.save(out)
    log(f"wrote {out}")
    return cost
