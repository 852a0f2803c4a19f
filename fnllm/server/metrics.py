"""Prometheus metrics with vLLM's names, each labelled ``model_name``.

Everything is computed from the engine's outputs and its immutable state
(the core counts preemptions and prefix-cache lookups in ``EngineState``);
the engine thread calls the ``on_*`` hooks, prometheus_client's metric
objects are thread-safe, and ``/metrics`` renders this module's own registry.

- gauges: ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (a fraction, 1.0 = full; cached blocks that no
  request holds count as free);
- counters: ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:num_preemptions_total``, ``vllm:prefix_cache_queries_total`` and
  ``vllm:prefix_cache_hits_total`` (in tokens), ``vllm:request_success_total``
  (label ``finished_reason``: stop, length, abort, error),
  ``vllm:spec_decode_num_drafts_total``, ``vllm:spec_decode_num_draft_tokens_total``
  and ``vllm:spec_decode_num_accepted_tokens_total`` (speculative decoding:
  rows that carried drafts, draft tokens verified, draft tokens accepted;
  the acceptance rate is accepted / draft tokens);
- histograms (seconds): ``vllm:time_to_first_token_seconds``,
  ``vllm:time_per_output_token_seconds`` (per finished request: time after
  its first token over the tokens after it), ``vllm:e2e_request_latency_seconds``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class ServerMetrics:
    """The server's metrics in their own registry; also the engine's stat logger."""

    def __init__(self, model_name: str) -> None:
        self.registry = reg = CollectorRegistry()
        lab = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", lab, registry=reg)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.", lab, registry=reg)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100 percent.", lab, registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of requests prefilled.", lab, registry=reg)
        self.gen_tokens = Counter("vllm:generation_tokens", "Tokens generated.", lab, registry=reg)
        self.preemptions = Counter("vllm:num_preemptions", "Sequence preemptions.", lab, registry=reg)
        self.cache_queries = Counter("vllm:prefix_cache_queries", "Prefix-cache lookups, in tokens.", lab, registry=reg)
        self.cache_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens.", lab, registry=reg)
        self.success = Counter(
            "vllm:request_success", "Finished requests by finish reason.", lab + ["finished_reason"], registry=reg
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token.", lab, buckets=_TTFT_BUCKETS, registry=reg
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds", "Time per output token after the first.", lab,
            buckets=_TPOT_BUCKETS, registry=reg,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", lab, buckets=_E2E_BUCKETS, registry=reg
        )
        self.spec_drafts = Counter("vllm:spec_decode_num_drafts", "Rows that carried speculative draft tokens.",
                                   lab, registry=reg)
        self.spec_draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Speculative draft tokens verified.",
                                         lab, registry=reg)
        self.spec_accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.",
                                     lab, registry=reg)
        self.model_name = model_name
        self._last = (0, 0, 0, 0, 0, 0)  # core counters already exported
        for m in (self.running, self.waiting, self.kv_usage, self.prompt_tokens, self.gen_tokens, self.preemptions,
                  self.cache_queries, self.cache_hits, self.ttft, self.tpot, self.e2e, self.spec_drafts,
                  self.spec_draft_tokens, self.spec_accepted):
            m.labels(model_name)  # present from the start, at 0
        for reason in ("stop", "length", "abort", "error"):
            self.success.labels(model_name, reason)

    # -- stat-logger hooks (engine thread) -----------------------------------------------
    def on_step(self, state, running: int, waiting: int) -> None:
        m = self.model_name
        self.running.labels(m).set(running)
        self.waiting.labels(m).set(waiting)
        pool = state.pool
        self.kv_usage.labels(m).set((pool.num_blocks - pool.num_free) / pool.num_blocks if pool.num_blocks else 0.0)
        now = (state.num_preemptions, state.prefix_cache_queries, state.prefix_cache_hits,
               state.spec_num_drafts, state.spec_num_draft_tokens, state.spec_num_accepted_tokens)
        counters = (self.preemptions, self.cache_queries, self.cache_hits, self.spec_drafts, self.spec_draft_tokens,
                    self.spec_accepted)
        for counter, new, old in zip(counters, now, self._last):
            if new > old:
                counter.labels(m).inc(new - old)
        self._last = now

    def on_tokens(self, live, out, new_tokens: int, first: bool, now: float) -> None:
        m = self.model_name
        self.gen_tokens.labels(m).inc(new_tokens)
        if first:
            self.ttft.labels(m).observe(now - live.arrival)
            self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))

    def on_finished(self, live, out, now: float) -> None:
        m = self.model_name
        reasons = [c.finish_reason for c in out.outputs if c.finish_reason]
        reason = "error" if "error" in reasons else (reasons[0] if reasons else "abort")
        self.success.labels(m, reason).inc()
        self.e2e.labels(m).observe(now - live.arrival)
        per_seq = max((len(c.token_ids) for c in out.outputs), default=0)
        if live.first_token is not None and per_seq > 1:
            self.tpot.labels(m).observe((now - live.first_token) / (per_seq - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
