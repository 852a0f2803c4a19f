"""``fnllm calibrate`` on a tiny checkpoint writes a valid cost file that
``fnllm simulate`` uses, with the model's default engine config inside."""

from __future__ import annotations

import json

from fnllm.cli import main
from fnllm.sim.cost import LINEAR_TERMS, load_cost_model


def test_calibrate_tiny_model_writes_a_usable_cost_file(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama
    out = tmp_path / "cost.json"
    assert main(["calibrate", "--model", str(path), "--device", "cpu", "--grid", "quick", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fit error: mean |relative error|" in printed
    cost = load_cost_model(str(out))
    assert cost.kind == "linear" and set(cost.coefficients) == set(LINEAR_TERMS)
    assert cost.coefficients["step"] > 0 and all(v >= 0 for v in cost.coefficients.values())
    config = cost.engine_config()
    # LLM(path)'s defaults: block 16, 1 GiB of float32 KV (2 layers x 2 x 2 heads x 16 x 4 bytes = 512 B per token)
    assert config.cache.block_size == 16 and config.cache.num_blocks == (1 << 30) // (512 * 16)
    assert config.model.vocab_size == 256 and config.model.eos_token_ids == (2,)
    assert config.scheduler.max_num_seqs == 64 and config.scheduler.max_model_len == 512
    knots = [t for t, _ in cost.token_curve]  # the step's time by tokens, at the grid's sizes
    assert knots == sorted(knots) and knots[0] == 1 and all(v >= 0 for _, v in cost.token_curve)
    assert cost.coefficients["token"] == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["samples"] and meta["fit_mean_abs_rel_error"] >= 0
    w = tmp_path / "w.jsonl"
    w.write_text("".join(json.dumps({"arrival": i * 0.01, "prompt_len": 20, "output_len": 5}) + "\n" for i in range(6)))
    assert main(["simulate", "--workload", str(w), "--cost-model", str(out), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["requests"] == 6 and m["generated_tokens"] == 30 and m["duration_s"] > 0
