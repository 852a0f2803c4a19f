"""The real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF): fnllm's greedy
continuations in float32, prompts batched together, equal transformers'
LlamaForCausalLM greedy generate on the same dequantized weights (read by
transformers' own GGUF code, which undoes llama.cpp's q/k permutation)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from fnllm.device.executor import ModelExecutor
from integration_support import Driver, Seq, make_plan

NEW_TOKENS = 16
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    out = []
    for q in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@pytest.fixture(scope="module")
def reference(smollm2_path):
    cfg = load_gguf_checkpoint(str(smollm2_path))["config"]
    cfg = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "_model_name_or_path")}
    with no_init_weights():
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    tensors = load_gguf_checkpoint(str(smollm2_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def executor(smollm2_path):
    return ModelExecutor(smollm2_path, dtype="float32", device="cpu", num_blocks=64, block_size=16)


def fnllm_greedy(ex: ModelExecutor, prompts: list[list[int]]) -> list[list[int]]:
    drv = Driver(ex.num_blocks, ex.block_size, seed=5)
    seqs = [Seq(list(p)) for p in prompts]
    out = [[] for _ in prompts]
    plan = make_plan([drv.row(s, len(s.tokens)) for s in seqs])
    for step in range(NEW_TOKENS):
        for s, o, g in zip(seqs, out, ex.execute(plan).sampled):
            o.append(g[0])
            s.tokens.append(g[0])
        plan = make_plan([drv.row(s, 1, output_pos=step + 1) for s in seqs])
    return out


def test_config_from_gguf(executor, tokenizer):
    assert executor.vocab_size == 49152 and executor.config.num_layers == 30
    assert executor.eos_token_ids == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert executor.gguf_path is not None and executor.max_position_embeddings == 8192


def test_capital_of_france(executor, prompts, tokenizer):
    out = fnllm_greedy(executor, prompts[:1])[0]
    assert tokenizer.decode(out).startswith("The capital of France is Paris.")


def test_greedy_matches_transformers(executor, reference, prompts):
    got = fnllm_greedy(executor, prompts)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            ref = reference.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        assert ref[0, len(p):].tolist() == g


def test_prompt_logprobs_match_transformers_full_forward(executor, reference, prompts):
    """Chunked prefill (chunks of 16) with prompt_logprobs equals one full forward's log-softmax."""
    from fnllm.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from fnllm.engine import LLMEngine
    from fnllm.state import SamplingParams

    cfg = EngineConfig(
        model=ModelConfig(vocab_size=executor.vocab_size, eos_token_ids=executor.eos_token_ids),
        cache=CacheConfig(block_size=16, num_blocks=64),
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=256),
    )
    eng = LLMEngine(cfg, executor)
    prompt = prompts[1]
    eng.add_request("p", prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
    out = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            out = o
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), -1)
    got = torch.tensor([out.prompt_logprobs[i][prompt[i]] for i in range(1, len(prompt))])
    want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert out.prompt_logprobs[0] is None and torch.allclose(got, want, atol=2e-3)
    tops = [max(e, key=e.get) for e in out.prompt_logprobs[1:]]
    assert tops == ref[:-1].argmax(-1).tolist()
