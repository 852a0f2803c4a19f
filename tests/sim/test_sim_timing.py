"""Hand-computed times, metric definitions, cost model terms, SLO search,
workloads from files and traces."""

from __future__ import annotations

import json
import math

import pytest

from fnllm.config import CacheConfig, EngineConfig, ModelConfig
from fnllm.device.fake import FakeExecutor
from fnllm.engine import LLMEngine
from fnllm.sim.cost import CostModel, features, load_cost_model
from fnllm.sim.executor import SimExecutor, filler_token
from fnllm.sim.loop import simulate
from fnllm.sim.report import metrics, percentile, sim_metrics
from fnllm.sim.search import max_rate, parse_slo, parse_sweeps, resolve
from fnllm.sim.workload import WorkItem, read_workload, synthetic
from fnllm.state import BatchPlan, SamplingParams
from fnllm.trace import TraceWriter

CONFIG = EngineConfig(model=ModelConfig(vocab_size=100, eos_token_ids=(0,)), cache=CacheConfig(block_size=4, num_blocks=64))
HAND = CostModel(coefficients={"step": 1.0, "token": 0.1})
WORK = (
    WorkItem(request_id="a", arrival=0.0, prompt_len=4, output_len=3),
    WorkItem(request_id="b", arrival=10.0, prompt_len=2, output_len=1),
)


def test_hand_computed_times():
    # a: prefill 4 tokens (1 + 0.4 = 1.4 s, first token), two decodes of 1.1 s: done at 3.6;
    # idle until b arrives at 10; b: prefill 2 tokens, 1.2 s, its only token at 11.2
    res = simulate(WORK, CONFIG, HAND)
    assert res.first_token == pytest.approx({"a": 1.4, "b": 11.2})
    assert res.finish == pytest.approx({"a": 3.6, "b": 11.2})
    m = sim_metrics(res)
    assert m["duration_s"] == pytest.approx(11.2)
    assert m["throughput_tok_s"] == pytest.approx(4 / 11.2)
    assert m["ttft_mean_s"] == pytest.approx(1.3)
    assert m["ttft_p99_s"] == pytest.approx(1.2 + 0.2 * 0.99)
    assert m["tpot_mean_s"] == pytest.approx(1.1) and m["tpot_p99_s"] == pytest.approx(1.1)
    assert m["requests"] == 2 and m["preemptions"] == 0 and m["peak_kv_usage"] == pytest.approx(2 / 64)


def test_the_loop_restores_the_collectors_thresholds():
    import gc

    class Broken:
        """An executor that fails on the first step."""

        def execute(self, plan):
            raise KeyboardInterrupt  # propagates out of the engine (after it repairs its state)

    before = gc.get_threshold()
    seen = []

    class Watching(SimExecutor):
        def execute(self, plan):
            seen.append(gc.get_threshold())
            return super().execute(plan)

    simulate(WORK, CONFIG, HAND, executor=Watching(filler_token(CONFIG.model.vocab_size, CONFIG.model.eos_token_ids)))
    assert gc.get_threshold() == before and seen and seen[0][0] >= 50_000 and seen[0][1:] == before[1:]
    with pytest.raises(KeyboardInterrupt):
        simulate(WORK, CONFIG, HAND, executor=Broken())
    assert gc.get_threshold() == before
    gc.set_threshold(0, *before[1:])  # automatic collection off: the loop leaves it off
    try:
        seen.clear()
        simulate(WORK, CONFIG, HAND, executor=Watching(filler_token(CONFIG.model.vocab_size, CONFIG.model.eos_token_ids)))
        assert seen and {t[0] for t in seen} == {0} and gc.get_threshold()[0] == 0
    finally:
        gc.set_threshold(*before)


def test_cli_hand_computed_times(tmp_path, capsys):
    from fnllm.cli import main

    w, c = tmp_path / "w.jsonl", tmp_path / "cost.json"
    w.write_text("".join(json.dumps({"request_id": it.request_id, "arrival": it.arrival, "prompt_len": it.prompt_len,
                                     "output_len": it.output_len}) + "\n" for it in WORK))
    c.write_text(json.dumps({"kind": "linear", "coefficients": {"step": 1.0, "token": 0.1}}))
    assert main(["simulate", "--workload", str(w), "--cost-model", str(c), "--json"]) == 0
    m = json.loads(capsys.readouterr().out.strip())
    assert m["duration_s"] == pytest.approx(11.2) and m["ttft_mean_s"] == pytest.approx(1.3)
    for key in ("duration_s", "throughput_tok_s", "requests", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
                "tpot_mean_s", "tpot_p99_s", "preemptions", "peak_kv_usage"):
        assert key in m


def test_token_curve_hand_computed_times():
    # the step's time by tokens: 1 s at 1 token, 1.3 s at 4 (linear between, from (0, 0) before the first point,
    # along the last segment after the last): a's 4-token prefill 1.3 s, its decodes 1 s each (done at 3.3);
    # b's 2-token prefill 1.1 s at 10
    cost = CostModel(coefficients={"step": 0.0}, token_curve=[[1, 1.0], [4, 1.3]])
    res = simulate(WORK, CONFIG, cost)
    assert res.first_token == pytest.approx({"a": 1.3, "b": 11.1})
    assert res.finish == pytest.approx({"a": 3.3, "b": 11.1})
    from fnllm.sim.cost import curve_at

    assert [curve_at([[1, 1.0], [4, 1.3]], x) for x in (0.5, 10)] == pytest.approx([0.5, 1.9])
    for bad in ([], [[4, 1.0], [2, 2.0]], [[1, -1.0]], [[0, 1.0]], "x"):
        with pytest.raises(ValueError, match="token_curve must be"):
            CostModel(token_curve=bad)
    with pytest.raises(ValueError, match="either a `token` coefficient or a token_curve"):
        CostModel(coefficients={"token": 1.0}, token_curve=[[1, 1.0]])


def test_cost_features_and_terms():
    plan = BatchPlan(step=0, seq_ids=(0, 1), request_ids=("x", "y"), token_ids=((1, 2, 3), (4,)), positions=(2, 9),
                     block_tables=((0, 1), (2, 3, 4)), num_samples=(1, 1), sample_index=(0, 0), output_pos=(0, 3),
                     sampling=(SamplingParams(),) * 2, copies=((1, 5),))
    f = features(plan)
    assert f == {"tokens": 4, "sampled_rows": 2, "prefill_pairs": 3 * 2 + 6, "decode_context": 10,
                 "copied_blocks": 1, "swapped_blocks": 0}
    c = CostModel(coefficients={"step": 1, "token": 10, "sample": 100, "prefill_attn": 1000, "decode_attn": 1e4, "copy": 1e5})
    assert c.step_seconds(plan) == pytest.approx(1 + 40 + 200 + 12000 + 100000 + 100000)
    assert c.step_seconds(BatchPlan(step=0)) == 0.0
    shape = {"num_layers": 2, "hidden_size": 8, "act_bytes": 2}
    hw = {"link_bytes_per_s": 64.0, "collective_latency_s": 0.5}
    tp2 = CostModel(coefficients={"token": 10}, model=shape, hardware=hw, tp=2)
    # per-token work halves; 2 all-reduces x 2 layers of 4 tokens x 8 x 2 bytes = 64 B, ring 2*(1/2)*64/64 = 1 s + 0.5 s
    assert tp2.step_seconds(plan) == pytest.approx(20 + 4 * 1.5)
    with pytest.raises(ValueError, match="unknown linear cost terms"):
        CostModel(coefficients={"flux": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        CostModel(coefficients={"step": -1.0})


def test_pangu_profile_is_an_estimate_that_scales_with_tp():
    cost = load_cost_model("pangu-7b-910b")
    text = json.dumps(cost.meta) + json.dumps(load_cost_model.__doc__)
    assert "estimate" in text
    blocks = [cost.with_parallel(tp=t).engine_config().cache.num_blocks for t in (1, 2, 4)]
    assert blocks[0] < blocks[1] < blocks[2] and cost.engine_config().cache.block_size == 128
    work = synthetic("n=40,rate=20,prompt=U(64,512),output=U(16,64)")
    tpot = [sim_metrics(simulate(work, cost.with_parallel(tp=t).engine_config(), cost.with_parallel(tp=t)))["tpot_mean_s"]
            for t in (1, 4)]
    assert tpot[1] < tpot[0]  # decode is memory bound: 4 NPUs stream a quarter of the weights each


def test_metric_definitions():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    m = metrics({"x": 1.0, "y": 2.0}, {"x": 1.5, "y": 4.0}, {"x": 3.5, "y": 4.0}, {"x": 5, "y": 1})
    assert m["duration_s"] == 3.0 and m["throughput_tok_s"] == pytest.approx(6 / 3.0)  # first arrival to last finish
    assert m["ttft_mean_s"] == pytest.approx(1.25) and m["tpot_mean_s"] == pytest.approx(0.5)


def test_max_rate_bisects_to_the_threshold():
    calls = []

    def run(r):
        calls.append(r)
        return {"ttft_p99_s": r / 10}

    rate, m = max_rate(run, {"ttft_p99_s": 2.0}, start=1.0, iters=12)
    assert 19.9 < rate <= 20.0 and m["ttft_p99_s"] <= 2.0
    assert max_rate(lambda r: {"ttft_p99_s": 9.0}, {"ttft_p99_s": 2.0}) == (0.0, None)
    assert parse_slo("ttft_p99=2,tpot_p99=0.1") == {"ttft_p99_s": 2.0, "tpot_p99_s": 0.1}
    assert parse_sweeps(["tp=1,2", "max_num_seqs=8,16"]) == [
        {"tp": "1", "max_num_seqs": "8"}, {"tp": "1", "max_num_seqs": "16"},
        {"tp": "2", "max_num_seqs": "8"}, {"tp": "2", "max_num_seqs": "16"}]


def test_resolve_applies_replays_keys_and_cost_keys():
    cost = load_cost_model("pangu-7b-910b")
    s = resolve(None, cost, {"max_num_seqs": "8", "cache.block_size": "64", "tp": "2", "rate": "3"})
    assert s.config.scheduler.max_num_seqs == 8 and s.config.cache.block_size == 64 and s.cost.tp == 2 and s.rate == 3.0
    with pytest.raises(ValueError, match="unknown config key"):
        resolve(None, cost, {"max_num_sequences": "8"})


def test_synthetic_is_seeded_and_rate_only_rescales():
    a = synthetic("n=50,rate=2,prompt=U(10,20),output=7,seed=3")
    b = synthetic("n=50,rate=4,prompt=U(10,20),output=7,seed=3")
    assert [x.prompt_len for x in a] == [x.prompt_len for x in b] and all(x.output_len == 7 for x in a)
    assert all(math.isclose(x.arrival, 2 * y.arrival) for x, y in zip(a, b))
    assert 1.0 < 49 / a[-1].arrival < 4.0


def test_a_recorded_trace_is_a_workload(tmp_path):
    config = CONFIG
    t = iter([0.0, 0.5, 0.5, 2.0] + [3.0] * 1000)
    path = tmp_path / "run.trace"
    rec = TraceWriter(str(path))
    engine = LLMEngine(config, FakeExecutor(64, 4, 100), clock=lambda: next(t), recorder=rec)
    engine.add_request("p", [5, 6, 7, 8, 9], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("q", [9, 8, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    rec.close()
    header = json.loads(path.read_text().split("\n")[0])
    assert header["version"] == 2
    work = {it.request_id: it for it in read_workload(str(path))}
    assert work["p"].arrival == 0.0 and work["q"].arrival == 0.5
    assert (work["p"].output_len, work["q"].output_len) == (4, 2)
    assert work["p"].prompt_token_ids == (5, 6, 7, 8, 9)
    # a version-1 trace (no arrival times) still reads: everything arrives at 0
    lines = path.read_text().split("\n")
    v1 = [json.dumps(dict(header, version=1))] + [json.dumps({k: v for k, v in json.loads(ln).items() if k != "arrival"})
                                                  for ln in lines[1:] if ln]
    old = tmp_path / "old.trace"
    old.write_text("\n".join(v1) + "\n")
    assert {it.arrival for it in read_workload(str(old))} == {0.0}
    from fnllm.replay import verify
    from fnllm.trace import read_trace

    assert verify(read_trace(str(path))) is None and verify(read_trace(str(old))) is None
