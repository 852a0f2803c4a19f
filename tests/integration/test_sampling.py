"""Sampling: seeded determinism independent of the batch, filters, logprobs."""

from __future__ import annotations

import pytest
import torch

from fnllm.device.executor import ModelExecutor
from fnllm.device.sampling import SampleRequest, sample
from fnllm.state import SamplingParams
from integration_support import GREEDY, Driver, Seq, make_plan, tokens

SEEDED = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)


def req(params, n=1, index=0, pos=0, rid=""):
    return SampleRequest(params, n, index, pos, rid)


@pytest.fixture(scope="module")
def executor(tiny_pangu):
    return ModelExecutor(tiny_pangu[0], device="cpu", num_blocks=64, block_size=8, seed=7)


def generate(ex, rows_spec, steps=6):
    """Run several sequences together; rows_spec: list of (prompt, params)."""
    drv = Driver(ex.num_blocks, ex.block_size, seed=len(rows_spec))
    seqs = [Seq(list(p)) for p, _ in rows_spec]
    out = [[] for _ in seqs]
    plan = make_plan([drv.row(s, len(s.tokens), params=prm) for s, (_, prm) in zip(seqs, rows_spec)])
    for step in range(steps):
        for s, o, g in zip(seqs, out, ex.execute(plan).sampled):
            o.append(g[0])
            s.tokens.append(g[0])
        plan = make_plan([drv.row(s, 1, params=prm, output_pos=step + 1) for s, (_, prm) in zip(seqs, rows_spec)])
    return out


def test_seeded_row_same_alone_and_in_batch(executor):
    prompt = tokens(9, 31)
    alone = generate(executor, [(prompt, SEEDED)])[0]
    others = [(tokens(14, 32), SamplingParams(temperature=1.0, seed=5)), (tokens(3, 33), GREEDY),
              (tokens(20, 34), SamplingParams(temperature=0.7, min_p=0.05))]
    batched = generate(executor, [others[0], (prompt, SEEDED), *others[1:]])[1]
    assert alone == batched
    assert generate(executor, [(prompt, SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99))])[0] != alone


def test_unseeded_rows_are_deterministic(executor):
    spec = [(tokens(6, 41), SamplingParams(temperature=1.0)), (tokens(6, 41), SamplingParams(temperature=1.0))]
    first, again = generate(executor, spec), generate(executor, spec)
    assert first == again
    assert first[0] != first[1]  # same prompt, different requests: different streams


def test_top_k_one_is_greedy():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    reqs = [req(SamplingParams(temperature=1.5, top_k=1, seed=i), pos=i) for i in range(5)]
    got, _ = sample(logits, reqs)
    assert [g[0] for g in got] == logits.argmax(-1).tolist()
    greedy, _ = sample(logits, [req(GREEDY, n=2) for _ in range(5)])
    assert greedy == tuple((t, t) for t in logits.argmax(-1).tolist())


def test_fork_samples_follow_their_streams():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=3)
    forked, _ = sample(logits, [req(params, n=4, index=0, pos=2)])
    singles = [sample(logits, [req(params, index=j, pos=2)])[0][0][0] for j in range(4)]
    assert list(forked[0]) == singles and len(set(singles)) > 1


def test_filters_and_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = lambda p: [sample(logits, [req(p, pos=i)])[0][0][0] for i in range(2000)]  # noqa: E731
    counts = torch.bincount(torch.tensor(draws(SamplingParams(temperature=1.0, seed=1))), minlength=4) / 2000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2))) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_k=3, seed=2))) == {0, 1, 2}
    assert set(draws(SamplingParams(temperature=1.0, min_p=0.4, seed=2))) == {0, 1}


def test_logprobs(executor):
    drv = Driver(executor.num_blocks, executor.block_size, seed=9)
    row = drv.row(Seq(tokens(12, 51)), 12, params=SamplingParams(temperature=1.0, seed=4, logprobs=3))
    plain = dict(drv.row(Seq(tokens(5, 52)), 5, params=GREEDY), num_samples=2)
    plan = make_plan([row, plain, drv.row(Seq(tokens(9, 53)), 4, num_samples=0)])
    ref = torch.log_softmax(executor.compute_logits(plan)[0], -1)
    out = executor.execute(plan)  # a plan is plain data: running it again rewrites the same KV
    assert len(out.sampled[0]) == 1 and len(out.sampled[1]) == 2 and out.sampled[2] == ()
    (lp,) = out.logprobs[0]
    assert len(lp) == 4 and lp[0][0] == out.sampled[0][0]
    assert lp[0][1] == pytest.approx(ref[lp[0][0]].item(), abs=1e-5)
    top = torch.topk(ref, 3)
    assert [t for t, _ in lp[1:]] == top.indices.tolist()
    assert [v for _, v in lp[1:]] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert out.logprobs[1] == () and out.logprobs[2] == ()


def test_no_logprobs_requested_gives_none():
    out = sample(torch.randn(2, 10), [req(GREEDY), req(SamplingParams(seed=1))])
    assert out[1] is None
