"""The ``fnllm`` command: real text, one-line errors, files, record and replay."""

from __future__ import annotations

import json

from fnllm.cli import main


def test_generate_chat_streams_the_answer(capsys, smollm2_path):
    rc = main(["generate", "--chat", "What is the capital of France?", "--max-tokens", "20", "--model", str(smollm2_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "Paris" in out


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    assert main(["generate", "hi", "--temperature", "-1", "--model", str(tmp_path / "missing.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fnllm: error:")
    assert main(["generate"]) == 2
    assert "prompt" in capsys.readouterr().err


def test_penalty_flags_become_sampling_params():
    from fnllm.cli import _sampling, build_parser

    args = build_parser().parse_args(["generate", "x", "--repetition-penalty", "1.3", "--frequency-penalty", "0.5",
                                      "--presence-penalty", "-0.5", "--logit-bias", '{"7": 2}', "--bad-word", "a",
                                      "--bad-word", "b c"])
    sp = _sampling(args)
    assert (sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty) == (1.3, 0.5, -0.5)
    assert dict(sp.logit_bias) == {7: 2.0} and sp.bad_words == ("a", "b c")
    assert _sampling(args, {"prompt_logprobs": 2, "allowed_token_ids": [1, 2]}).prompt_logprobs == 2


def test_prompts_file_output_record_and_replay(capsys, tmp_path, smollm2_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "The capital of Italy is", "prompt_logprobs": 1, "logit_bias": {"5": -1.5}}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6}) + "\n"
    )
    out, trace = tmp_path / "o.jsonl", tmp_path / "t.jsonl"
    rc = main(["generate", "--prompts-file", str(prompts), "--output", str(out), "--max-tokens", "8",
               "--record", str(trace), "--model", str(smollm2_path), "--repetition-penalty", "1.2",
               "--frequency-penalty", "0.5", "--presence-penalty", "0.1", "--bad-word", "Rome"])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 2 and len(rows[1]["outputs"][0]["token_ids"]) <= 6 and rows[0]["outputs"][0]["text"]
    assert "Rome" not in rows[0]["outputs"][0]["text"] and "prompt_logprobs" not in rows[1]
    assert rows[0]["prompt_logprobs"][0] is None and all(rows[0]["prompt_logprobs"][1:])
    capsys.readouterr()
    assert main(["replay", str(trace)]) == 0
    assert "reproduced" in capsys.readouterr().out
    assert main(["replay", str(trace), "--step", "1"]) == 0
    assert "pool:" in capsys.readouterr().out
    assert main(["replay", str(trace), "--set", "cache.block_size=4"]) == 0
    assert "what-if" in capsys.readouterr().out
    lines = trace.read_text().splitlines()
    step = next(k for k, x in enumerate(lines) if json.loads(x)["type"] == "step" and any(json.loads(x)["sampled"]))
    rec = json.loads(lines[step])
    row = next(r for r, s in enumerate(rec["sampled"]) if s)
    rec["sampled"][row][0] = (rec["sampled"][row][0] + 1) % 1000
    lines[step] = json.dumps(rec)
    trace.write_text("\n".join(lines) + "\n")
    assert main(["replay", str(trace)]) == 1
    assert f"step {rec['step']}" in capsys.readouterr().out
