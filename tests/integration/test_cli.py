"""The ``fnllm`` command: real text, one-line errors, files, record and replay."""

from __future__ import annotations

import json
import re

import pytest

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


def test_speculative_config_flag_generates_records_and_replays(capsys, tmp_path, smollm2_path):
    trace = tmp_path / "spec.jsonl"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
    prompt = "one two three, one two three, one two three, one two three,"
    rc = main(["generate", prompt, "--max-tokens", "12", "--json", "--record", str(trace), "--speculative-config", spec,
               "--model", str(smollm2_path)])
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(row["outputs"][0]["token_ids"]) == 12
    header = json.loads(trace.read_text().splitlines()[0])
    assert header["config"]["speculative"]["num_speculative_tokens"] == 3
    assert any(json.loads(x).get("rows", {}).get("num_draft_tokens") for x in trace.read_text().splitlines()[1:])
    assert main(["replay", str(trace)]) == 0
    assert "reproduced" in capsys.readouterr().out
    for bad, why in (("{not json", "not valid JSON"), ('{"method": "ngram"}', "num_speculative_tokens"),
                     ('[1]', "JSON object")):
        assert main(["generate", "hi", "--speculative-config", bad, "--model", str(smollm2_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err


@pytest.mark.slow
def test_guided_flags_record_and_device_replay(capsys, tmp_path, smollm2_path):
    """--guided-regex output matches; its trace replays exactly, on the model too (grammar state from the plans)."""
    pytest.importorskip("xgrammar")
    date = r"\d{4}-\d{2}-\d{2}"
    out, trace = tmp_path / "o.jsonl", tmp_path / "t.jsonl"
    rc = main(["generate", "--chat", "When was the moon landing?", "--guided-regex", date, "--temperature", "1.0",
               "--seed", "3", "--max-tokens", "16", "--json", "--output", str(out), "--record", str(trace),
               "--model", str(smollm2_path)])
    assert rc == 0
    text = json.loads(out.read_text().splitlines()[0])["outputs"][0]["text"]
    assert re.fullmatch(date, text), text
    capsys.readouterr()
    assert main(["replay", str(trace), "--device", "cpu"]) == 0
    assert "reproduced" in capsys.readouterr().out
    assert main(["generate", "hi", "--guided-regex", date, "--guided-choice", "a", "--model", str(smollm2_path)]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_console_entry_exits_quickly_with_everything_written(tmp_path, smollm2_path):
    """``python -m fnllm.cli`` ends with os._exit after the atexit hooks: the
    printed text, the output file and the recorded trace are all complete,
    and the exit status is main()'s."""
    import os
    import subprocess
    import sys

    out, trace = tmp_path / "out.jsonl", tmp_path / "t.jsonl"
    cmd = [sys.executable, "-m", "fnllm.cli", "generate", "The capital of France is", "--max-tokens", "3",
           "--model", str(smollm2_path), "--output", str(out), "--json", "--record", str(trace)]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text().strip()) == printed and len(printed["outputs"][0]["token_ids"]) == 3
    assert main(["replay", str(trace)]) == 0  # the trace was flushed and closed
    bad = subprocess.run(cmd[:4] + ["--temperature", "-1"], capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("fnllm: error:")
