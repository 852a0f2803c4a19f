"""``fnllm simulate`` end to end, and bad input as one ``fnllm: error:`` line."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from fnllm.cli import main

ROOT = pathlib.Path(__file__).parents[2]
SYN = "n=30,rate=50,prompt=U(16,64),output=U(4,16)"


def _err(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fnllm: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("line, needle", [
    ("not json", "line 2: not valid JSON"),
    ('{"arrival": 0, "prompt_len": 4}', "'output_len'"),
    ('{"arrival": -1, "prompt_len": 4, "output_len": 2}', "'arrival'"),
    ('{"arrival": 0, "prompt_len": 0, "output_len": 2}', "'prompt_len'"),
    ('{"arrival": 0, "prompt_len": 2, "output_len": 2, "prompt_token_ids": [1, "x"]}', "'prompt_token_ids'"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_workload_lines(tmp_path, capsys, line, needle):
    w = tmp_path / "w.jsonl"
    w.write_text('{"arrival": 0, "prompt_len": 4, "output_len": 2}\n' + line + "\n")
    assert needle in _err(capsys, ["simulate", "--workload", str(w)])


def test_bad_flags(tmp_path, capsys):
    assert "unknown cost model 'no-such-hw'" in _err(capsys, ["simulate", "--synthetic", SYN, "--cost-model", "no-such-hw"])
    assert "unknown config key 'max_num_sequences'" in _err(capsys, ["simulate", "--synthetic", SYN, "--set", "max_num_sequences=4"])
    assert "must be an integer" in _err(capsys, ["simulate", "--synthetic", SYN, "--set", "max_num_seqs=many"])
    assert "KEY=VALUE" in _err(capsys, ["simulate", "--synthetic", SYN, "--set", "max_num_seqs"])
    assert "unknown key 'speed'" in _err(capsys, ["simulate", "--synthetic", "n=3,speed=2"])
    assert "U(a,b)" in _err(capsys, ["simulate", "--synthetic", "n=3,prompt=N(3,4)"])
    assert "unknown metric" in _err(capsys, ["simulate", "--synthetic", SYN, "--slo", "latency=2"])
    assert "tp must be a positive integer" in _err(capsys, ["simulate", "--synthetic", SYN, "--sweep", "tp=1,0"])
    bad = tmp_path / "cost.json"
    bad.write_text('{"kind": "linear", "coefficients": {"step": "fast"}}')
    assert "coefficient 'step'" in _err(capsys, ["simulate", "--synthetic", SYN, "--cost-model", str(bad)])
    assert "No such file" in _err(capsys, ["simulate", "--workload", str(tmp_path / "missing.jsonl")])


def test_error_is_one_line_from_the_command(tmp_path):
    w = tmp_path / "w.jsonl"
    w.write_text("{oops\n")
    out = subprocess.run([sys.executable, "-m", "fnllm.cli", "simulate", "--workload", str(w)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("fnllm: error: "), out.stderr


def test_sweep_slo_and_plot(tmp_path, capsys):
    assert main(["simulate", "--synthetic", SYN, "--cost-model", "pangu-7b-910b", "--sweep", "max_num_seqs=2,16", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().split("\n")]
    assert [r["max_num_seqs"] for r in rows] == [2, 16] and rows[0]["ttft_p99_s"] > rows[1]["ttft_p99_s"]
    png = tmp_path / "out.png"
    assert main(["simulate", "--synthetic", SYN, "--cost-model", "pangu-7b-910b", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["simulate", "--synthetic", "n=40,rate=5,prompt=U(64,256),output=U(8,32)", "--cost-model", "pangu-7b-910b",
                 "--slo", "ttft_p99=0.2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["max_rate_rps"] > 0 and row["ttft_p99_s"] <= 0.2


def test_sim_imports_no_torch_and_no_device():
    code = (
        "import sys\nfor m in ('torch', 'numpy'):\n    sys.modules[m] = None\n"
        "import fnllm.sim, fnllm.sim.plot, fnllm.sim.search, fnllm.sim_cli\n"
        "from fnllm.sim import simulate, synthetic, load_cost_model\n"
        "c = load_cost_model('pangu-7b-910b')\n"
        "r = simulate(synthetic('n=5,rate=5,prompt=U(8,16),output=U(2,4)'), c.engine_config(), c)\n"
        "assert len(r.finish) == 5\n"
        "bad = [m for m in sys.modules if m.startswith('fnllm.device') or m.startswith('fnllm.model')]\n"
        "assert not bad, bad\nprint('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
