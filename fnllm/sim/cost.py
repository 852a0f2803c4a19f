"""``CostModel``: a plan -> the seconds its step takes.

Two explainable forms, both over the same plan features (:func:`features`):

- ``linear`` (fitted by ``fnllm calibrate`` on a real device)::

      seconds = step + token * tokens + sample * sampled_rows
                + prefill_attn * prefill_pairs + decode_attn * decode_context
                + copy * copied_blocks + swap * swapped_blocks + collectives

  With a ``token_curve`` (``[[tokens, seconds], ...]``, tokens increasing),
  ``token * tokens`` is replaced by that curve read at the step's tokens:
  linear between its points, from (0, 0) to the first, and along its last
  segment beyond the last. A device's linears are not linear in the rows
  they multiply (a few rows stream the weights, more rows run a GEMM whose
  speed depends on the row count), and the curve is what ``fnllm calibrate``
  measured at each size.

- ``roofline`` (from a hardware datasheet and a model shape)::

      seconds = step_overhead + max(flops / (peak_flops * flops_eff),
                                    bytes / (hbm_bytes_per_s * hbm_eff)) + collectives

Features: ``tokens`` = tokens through the layers; ``sampled_rows`` = rows
that produce logits; ``prefill_pairs`` = (query, key) pairs of multi-token
rows (a row of ``n`` tokens at position ``p`` attends ``n*p + n(n+1)/2``
pairs); ``decode_context`` = keys read by single-token rows (``p + 1``
each); ``copied_blocks`` (copy-on-write); ``swapped_blocks`` (any plan field
named ``*swap*``, for the CPU tier).

Parallelism (``tp``, ``pp``): tensor parallelism divides the per-token and
attention work by ``tp`` and adds two all-reduces of ``tokens * hidden``
activations per layer (ring: ``2 (tp-1)/tp * bytes / link`` plus a latency
per call). Pipeline parallelism without micro-batching (fnllm runs one
plan at a time) leaves the compute as is and adds ``pp - 1`` point-to-point
transfers per step; it buys KV memory, not speed.

The cost file (JSON) may carry ``config`` (an EngineConfig in trace form:
the engine defaults of the model it describes) and, for rooflines, the
memory that sizes the KV cache per TP degree. Pure Python, no torch.
"""

from __future__ import annotations

import json
import math
import os
from importlib import resources
from operator import attrgetter

import attrs

from fnllm.state import BatchPlan

FEATURES = ("tokens", "sampled_rows", "prefill_pairs", "decode_context", "copied_blocks", "swapped_blocks")
LINEAR_TERMS = ("step", "token", "sample", "prefill_attn", "decode_attn", "copy", "swap")
TERM_OF = dict(zip(FEATURES, LINEAR_TERMS[1:]))  # feature -> the linear term that prices it


_SWAP_FIELDS = tuple(f.name for f in attrs.fields(BatchPlan) if "swap" in f.name)
_swap_columns = attrgetter(*_SWAP_FIELDS)


def _swap_count(plan: BatchPlan) -> int:
    return sum(map(len, _swap_columns(plan)))


def features(plan: BatchPlan) -> dict:
    """The plan's cost inputs (see the module docstring)."""
    return dict(zip(FEATURES, feature_values(plan)))


def feature_values(plan: BatchPlan) -> tuple:
    """:func:`features` as a tuple in ``FEATURES`` order (the simulator's hot path)."""
    lens = list(map(len, plan.token_ids))
    rows = len(lens)
    if lens.count(1) == rows:  # single-token rows only (the common step): column-wise
        tokens, sampled, pairs, ctx = rows, rows - plan.num_samples.count(0), 0, sum(plan.positions) + rows
    else:
        tokens = sampled = pairs = ctx = 0
        for n, pos, ns in zip(lens, plan.positions, plan.num_samples):
            tokens += n
            if ns:
                sampled += 1
            if n == 1:
                ctx += pos + 1
            else:
                pairs += n * pos + n * (n + 1) // 2
    return tokens, sampled, pairs, ctx, len(plan.copies), _swap_count(plan)


def curve_at(curve: list, x: float) -> float:
    """A piecewise-linear curve ``[[x, y], ...]`` at ``x`` (see the module docstring)."""
    px = py = qx = qy = 0.0  # (px, py): the point before (qx, qy)
    for x1, y1 in curve:
        if x <= x1:
            return qy + (y1 - qy) * (x - qx) / (x1 - qx)
        px, py, qx, qy = qx, qy, x1, y1
    return py + (qy - py) * (x - px) / (qx - px)  # beyond the last point: along the last segment


def _check_curve(curve) -> None:
    ok = isinstance(curve, list) and len(curve) >= 1 and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in p)
        for p in curve)
    if not ok or any(b[0] <= a[0] for a, b in zip([[0, 0]] + list(curve), curve)):
        raise ValueError(f"token_curve must be [[tokens, seconds], ...] with tokens > 0 increasing and "
                         f"seconds >= 0, got {curve!r}")


@attrs.frozen(kw_only=True)
class CostModel:
    kind: str = "linear"
    coefficients: dict = attrs.field(factory=dict)  # linear: term -> seconds per unit
    hardware: dict = attrs.field(factory=dict)  # roofline (and link figures for collectives)
    model: dict = attrs.field(factory=dict)  # shape: num_layers, hidden_size, ... (collectives, roofline)
    tp: int = 1
    pp: int = 1
    token_curve: list | None = None  # linear: [[tokens, seconds], ...] instead of the `token` term
    config: dict | None = None  # EngineConfig in trace form: the engine defaults it predicts
    meta: dict = attrs.field(factory=dict)  # name, source, notes, fit error
    # linear: the coefficients of LINEAR_TERMS in order, as a tuple (derived from `coefficients`)
    _weights: tuple = attrs.field(init=False, default=(), eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("linear", "roofline"):
            raise ValueError(f"cost model kind must be 'linear' or 'roofline', got {self.kind!r}")
        for name, v in (("tp", self.tp), ("pp", self.pp)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.kind == "linear":
            unknown = set(self.coefficients) - set(LINEAR_TERMS)
            if unknown:
                raise ValueError(f"unknown linear cost terms {sorted(unknown)} (known: {', '.join(LINEAR_TERMS)})")
            for k, v in self.coefficients.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"cost coefficient {k!r} must be a finite number >= 0, got {v!r}")
            object.__setattr__(self, "_weights", tuple(self.coefficients.get(t, 0.0) for t in LINEAR_TERMS))
            if self.token_curve is not None:
                _check_curve(self.token_curve)
                if self.coefficients.get("token"):
                    raise ValueError("a cost model has either a `token` coefficient or a token_curve, not both")
        else:
            need = ("peak_flops", "hbm_bytes_per_s")
            missing = [k for k in need if k not in self.hardware] + [k for k in ("num_params", "num_layers", "hidden_size") if k not in self.model]
            if missing:
                raise ValueError(f"roofline cost model lacks {missing}")
        if (self.tp > 1 or self.pp > 1) and ("num_layers" not in self.model or "hidden_size" not in self.model):
            raise ValueError("tp/pp > 1 needs the model shape (num_layers, hidden_size) in the cost model")

    # -- a step ----------------------------------------------------------------------
    def step_seconds(self, plan: BatchPlan) -> float:
        f = feature_values(plan)
        if not len(plan) and not f[4] and not f[5]:
            return 0.0
        body = self._linear(f) if self.kind == "linear" else self._roofline(dict(zip(FEATURES, f)))
        return body + self._collectives(f[0])

    def _linear(self, f: tuple) -> float:
        w = self._weights  # LINEAR_TERMS: the step, then one per feature in FEATURES order (TERM_OF)
        per_token = w[1] * f[0] + w[2] * f[1] + w[3] * f[2] + w[4] * f[3]  # tokens, sampled rows, attention pairs
        if self.token_curve is not None:
            per_token += curve_at(self.token_curve, f[0])
        other = w[5] * f[4] + w[6] * f[5]  # copied and swapped blocks
        return w[0] + per_token / self.tp + other

    def _roofline(self, f: dict) -> float:
        hw, m, tp = self.hardware, self.model, self.tp
        flops = 2.0 * m["num_params"] * f["tokens"] + 2.0 * m["hidden_size"] * m.get("vocab_size", 0) * f["sampled_rows"]
        attn = 4.0 * m["num_layers"] * m.get("num_heads", 0) * m.get("head_dim", 0)
        flops += attn * (f["prefill_pairs"] + f["decode_context"])
        kv_tok = self.kv_bytes_per_token()
        # weights once per step; decode rows read their context's KV, every token writes its own
        nbytes = self.weight_bytes() + kv_tok * (f["decode_context"] + f["tokens"])
        compute = flops / tp / (hw["peak_flops"] * hw.get("flops_efficiency", 1.0))
        memory = nbytes / tp / (hw["hbm_bytes_per_s"] * hw.get("hbm_efficiency", 1.0))
        copies = (f["copied_blocks"] + f["swapped_blocks"]) * kv_tok * self.block_size() / tp / (hw["hbm_bytes_per_s"] * hw.get("hbm_efficiency", 1.0))
        return hw.get("step_overhead_s", 0.0) + max(compute, memory) + copies

    def _collectives(self, tokens: int) -> float:
        if self.tp == 1 and self.pp == 1:
            return 0.0
        hw, m = self.hardware, self.model
        act = tokens * m["hidden_size"] * m.get("act_bytes", 2)
        bw = hw.get("link_bytes_per_s", 0.0) * hw.get("link_efficiency", 1.0)
        lat = hw.get("collective_latency_s", 0.0)
        t = 0.0
        if self.tp > 1:
            ring = 2.0 * (self.tp - 1) / self.tp * act
            t += 2 * m["num_layers"] * ((ring / bw if bw else 0.0) + lat)
        if self.pp > 1:
            t += (self.pp - 1) * ((act / bw if bw else 0.0) + lat)
        return t

    # -- memory (roofline profiles size their KV cache) ---------------------------------
    def kv_bytes_per_token(self) -> float:
        m = self.model
        return 2.0 * m.get("num_layers", 0) * m.get("num_kv_heads", 0) * m.get("head_dim", 0) * m.get("act_bytes", 2)

    def weight_bytes(self) -> float:
        """Weights read per step: the layers' ``num_params`` plus the LM head."""
        m = self.model
        return (float(m.get("num_params", 0)) + m.get("hidden_size", 0) * m.get("vocab_size", 0)) * m.get("param_bytes", 2)

    def resident_bytes(self) -> float:
        """Weights held in memory (``total_params`` when given: embeddings too)."""
        m = self.model
        return float(m["total_params"]) * m.get("param_bytes", 2) if "total_params" in m else self.weight_bytes()

    def block_size(self) -> int:
        return int((self.config or {}).get("cache", {}).get("block_size", 16))

    def num_blocks_for(self, block_size: int) -> int | None:
        """KV blocks per the profile's memory at this tp x pp (None: not modelled)."""
        hw = self.hardware
        if "hbm_bytes" not in hw or not self.model.get("num_kv_heads"):
            return None
        devices = self.tp * self.pp
        usable = hw["hbm_bytes"] * hw.get("memory_utilization", 0.9) * devices
        free = usable - self.resident_bytes() - hw.get("activation_reserve_bytes", 0) * devices
        return max(0, int(free // (self.kv_bytes_per_token() * block_size)))

    def engine_config(self):
        """The EngineConfig this cost file predicts (None when it has none)."""
        if self.config is None:
            return None
        from fnllm.trace import config_from_json

        config = config_from_json(self.config)
        n = self.num_blocks_for(config.cache.block_size)
        if n is not None and (self.tp > 1 or self.pp > 1 or self.meta.get("size_kv_from_memory")):
            config = attrs.evolve(config, cache=attrs.evolve(config.cache, num_blocks=max(1, n)))
        return config

    def with_parallel(self, tp: int | None = None, pp: int | None = None) -> "CostModel":
        return attrs.evolve(self, tp=self.tp if tp is None else tp, pp=self.pp if pp is None else pp)

    # -- files -------------------------------------------------------------------------
    def to_json(self) -> dict:
        return attrs.asdict(self, filter=lambda a, _: a.init)  # not the derived `_weights`

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
            f.write("\n")

    @classmethod
    def from_json(cls, d: dict, source: str = "cost model") -> "CostModel":
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object")
        known = {f.name for f in attrs.fields(cls) if f.init}
        extra = sorted(set(d) - known - {"comment", "sources"})
        if extra:
            raise ValueError(f"{source}: unknown cost model fields {extra}")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except (TypeError, KeyError) as e:
            raise ValueError(f"{source}: {e}") from None


def profile_names() -> list[str]:
    """The bundled hardware profiles (fnllm/sim/profiles/NAME.json)."""
    root = resources.files("fnllm.sim") / "profiles"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def load_cost_model(name_or_path: str) -> CostModel:
    """A cost file by path, or a bundled profile by name."""
    if os.path.exists(name_or_path):
        path, text = name_or_path, open(name_or_path, encoding="utf-8").read()
    else:
        ref = resources.files("fnllm.sim") / "profiles" / f"{name_or_path}.json"
        if not ref.is_file():
            raise ValueError(f"unknown cost model {name_or_path!r}: not a file, and not a bundled profile "
                             f"(known: {', '.join(profile_names()) or 'none'})")
        path, text = str(ref), ref.read_text(encoding="utf-8")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return CostModel.from_json(d, path)
