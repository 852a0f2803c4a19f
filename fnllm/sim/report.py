"""Metrics of a run (simulated or measured), vLLM's definitions.

- ``duration_s``: first arrival to last finish;
- ``throughput_tok_s``: generated tokens / ``duration_s``;
- TTFT: arrival to the end of the step that produced the request's first token;
- TPOT: ``(finish - first token) / (output tokens - 1)`` per request with
  more than one output token;
- percentiles interpolate linearly between order statistics (numpy's default);
- ``peak_kv_usage``: the largest fraction of KV blocks held by live sequences.
"""

from __future__ import annotations

import math


def percentile(values, q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def metrics(arrival: dict, first_token: dict, finish: dict, output_len: dict, *, preemptions: int = 0,
            peak_kv_usage: float = 0.0, rejected: int = 0) -> dict:
    """The report's JSON object for one run (requests that finished count)."""
    done = [r for r in finish if r in arrival]
    ttft = [first_token[r] - arrival[r] for r in done if r in first_token]
    tpot = [(finish[r] - first_token[r]) / (output_len[r] - 1) for r in done if output_len.get(r, 0) > 1 and r in first_token]
    start = min((arrival[r] for r in done), default=0.0)
    end = max((finish[r] for r in done), default=0.0)
    duration = end - start
    tokens = sum(output_len.get(r, 0) for r in done)
    return {
        "duration_s": duration,
        "throughput_tok_s": tokens / duration if duration > 0 else float("nan"),
        "requests": len(done),
        "rejected": rejected,
        "generated_tokens": tokens,
        "ttft_mean_s": _mean(ttft),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_mean_s": _mean(tpot),
        "tpot_p99_s": percentile(tpot, 99),
        "preemptions": preemptions,
        "peak_kv_usage": peak_kv_usage,
    }


def sim_metrics(res) -> dict:
    """:func:`metrics` of a :class:`fnllm.sim.loop.SimResult`."""
    out = metrics(res.arrival, res.first_token, res.finish, res.output_len, preemptions=res.preemptions,
                  peak_kv_usage=res.peak_kv_blocks / res.config.cache.num_blocks, rejected=len(res.rejected))
    out["steps"] = res.steps
    return out


def rounded(d: dict, digits: int = 6) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) and math.isfinite(v) else (None if isinstance(v, float) else v))
            for k, v in d.items()}


COLUMNS = ("throughput_tok_s", "ttft_mean_s", "ttft_p90_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s", "preemptions", "peak_kv_usage")


def table(rows: list[tuple[str, dict]], columns=COLUMNS) -> str:
    """A plain-text table, one row per (label, metrics)."""
    head = ["config"] + list(columns)
    body = [[label] + [_fmt(m.get(c)) for c in columns] for label, m in rows]
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(str(x).rjust(w) for x, w in zip(r, widths)) for r in [head] + body)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
