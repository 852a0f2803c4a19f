"""``batch_invariant=True``: a sequence's logits are bit-identical whatever
else is in its steps and however its prompt is chunked.

The property (hypothesis, tiny random checkpoints, float32 and bfloat16): a
target sequence's logits at every position where a chunk of it ends, and at
every greedy decode step after its prompt, equal bit for bit those of the
target run alone one token per step; in the batched run its prompt is cut
into random chunks and every step carries a random set of other rows (new
prompt chunks of random lengths, before or after it). The real-model test:
16 chat and raw prompts, 48 greedy tokens each, solo against one batch.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm.device import cpu_kernels
from fnllm.device.executor import ModelExecutor
from integration_support import Driver, Seq, make_plan, tokens

BLOCK = 4
NUM_BLOCKS = 2048
_executors: dict = {}

pytestmark = pytest.mark.skipif(cpu_kernels.load() is None, reason="the fused CPU kernels did not build here")


def executor(path, dtype: str) -> ModelExecutor:
    key = (str(path), dtype)
    if key not in _executors:
        _executors[key] = ModelExecutor(path, dtype=dtype, device="cpu", num_blocks=NUM_BLOCKS, block_size=BLOCK,
                                        batch_invariant=True)
    return _executors[key]


def solo_logits(ex, drv, seq_tokens, num_decode):
    """Alone, one token per step: the logits after each position, and the greedy continuation."""
    seq = Seq(list(seq_tokens))
    out = []
    for _ in range(len(seq_tokens)):
        out.append(ex.compute_logits(make_plan([drv.row(seq, 1)]))[0])
    for _ in range(num_decode):
        seq.tokens.append(int(out[-1].argmax()))
        out.append(ex.compute_logits(make_plan([drv.row(seq, 1)]))[0])
    return out, seq.tokens


@pytest.fixture(params=["tiny_llama", "tiny_pangu"], scope="module")
def ckpt_path(request):
    return request.getfixturevalue(request.param)[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_logits_do_not_depend_on_the_batch(ckpt_path, dtype, data):
    ex = executor(ckpt_path, dtype)
    seed = data.draw(st.integers(0, 10_000), label="seed")
    rng = random.Random(seed)
    drv = Driver(NUM_BLOCKS, BLOCK, seed=seed)
    prompt_len = data.draw(st.integers(1, 40), label="prompt_len")
    num_decode = data.draw(st.integers(1, 4), label="num_decode")
    target = tokens(prompt_len, seed)
    want, full = solo_logits(ex, drv, target, num_decode)

    seq, done = Seq(list(full[:prompt_len])), 0
    while done < prompt_len + num_decode:
        if done < prompt_len:
            n = rng.randint(1, prompt_len - done)
        else:
            seq.tokens.append(full[done])
            n = 1
        others = [Seq(tokens(rng.randint(1, 24), rng.randrange(1 << 30))) for _ in range(rng.randint(0, 5))]
        rows = [drv.row(o, len(o.tokens)) for o in others]
        at = rng.randint(0, len(rows))
        rows.insert(at, drv.row(seq, n))
        logits = ex.compute_logits(make_plan(rows))
        done += n
        got = logits[at]
        assert torch.equal(got, want[done - 1]), (
            f"position {done - 1}: batched logits differ from solo by {float((got - want[done - 1]).abs().max())}")


def test_single_row_linear_matches_batched_rows(tiny_llama):
    """The case that needs care: one row alone goes through the GEMM as two."""
    ex = executor(tiny_llama[0], "bfloat16")
    w = ex.model.layers[0].gate_up_weight
    x = torch.randn(9, ex.config.hidden_size).bfloat16()
    many = ex.backend.linear(x, w)
    for i in range(9):
        assert torch.equal(ex.backend.linear(x[i : i + 1], w), many[i : i + 1])


def test_bad_settings_are_clear_errors(tiny_llama, monkeypatch):
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        ModelExecutor(tiny_llama[0], dtype="float16", device="cpu", num_blocks=8, block_size=BLOCK, batch_invariant=True)
    monkeypatch.setenv("FNLLM_CPU_KERNELS", "0")
    with pytest.raises(ValueError, match="fused CPU kernels"):
        ModelExecutor(tiny_llama[0], dtype="float32", device="cpu", num_blocks=8, block_size=BLOCK, batch_invariant=True)


@pytest.mark.slow
def test_demo_model_solo_equals_batch(smollm2_path):
    """16 chat and raw prompts, 48 greedy tokens each: alone, and all in one batch
    (which also meets the solo runs' blocks in the prefix cache: other chunk boundaries)."""
    from fnllm.llm import LLM
    from fnllm.state import SamplingParams

    llm = LLM(str(smollm2_path), dtype="bfloat16", device="cpu", num_kv_blocks=1024, batch_invariant=True)
    tok = llm.get_tokenizer()
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
                 "List three fruits.", "Who wrote Hamlet?", "What is 17 times 23?", "Describe a cat.",
                 "Give me a recipe for pancakes."]
    raw = ["The three primary colors are", "Once upon a time", "In 1492, Columbus", "The quick brown fox",
           "def fibonacci(n):", "The meaning of life is", "Paris is the capital of", "Water boils at"]
    prompts = [{"prompt_token_ids": tok.apply_chat_template_ids([{"role": "user", "content": q}])}
               for q in questions] + raw
    sp = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    solo = [llm.generate([p], sp, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert [i for i in range(16) if solo[i] != batch[i]] == []
    llm.shutdown()


def test_cli_flag(smollm2_path, capsys):
    from fnllm.cli import build_parser, main

    assert build_parser().parse_args(["serve", "--batch-invariant"]).batch_invariant is True
    assert main(["generate", "--model", str(smollm2_path), "--batch-invariant", "--dtype", "float16",
                 "--num-kv-blocks", "8", "--max-tokens", "1", "Hi"]) == 2
    assert "batch_invariant=True runs on the CPU torch backend in float32 or bfloat16" in capsys.readouterr().err
