"""Start-up time on a warm machine (set-up done: the demo GGUF converted once).

Whole-process wall times, each the median (and min) of ``--runs`` fresh
processes (interleaved, so that the machine's drift hits every figure alike),
with each process's CPU seconds (user + system, all threads: on a shared
machine the steadier figure), measured in the same run as their yardstick:

- ``import_torch``: ``python -c "import torch"`` (the floor every figure below
  pays: the interpreter and torch's own import);
- ``cli``: ``python -m fnllm.cli generate --max-tokens 1 "Hi"`` (the default
  float32; target <= 2 s);
- ``llm``: a process that imports fnllm and builds ``LLM()``; besides its wall
  time it reports the constructor alone (``perf_counter`` around ``LLM()``;
  target <= 1.5 s), for the default float32 and for ``--dtype bfloat16``;
- ``llm_uncached``: ``LLM()`` the old way, from the GGUF itself
  (``FNLLM_GGUF_CACHE=0``: metadata parsed in pure Python, tokenizer through
  transformers), ``--old-runs`` processes.

    python benchmarks/bench_startup.py [--runs 5] [--old-runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLM_SNIPPET = (
    "import time, sys; import torch; import fnllm; t = time.perf_counter(); "
    "llm = fnllm.LLM(dtype=sys.argv[1]); print('CTOR', time.perf_counter() - t)"
)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(cmd: list[str], env: dict | None = None) -> tuple[float, float | None, float]:
    """Wall seconds of one process, the constructor time it printed (if any), and its CPU seconds."""
    c, t = _children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall, cpu = time.perf_counter() - t, _children_cpu() - c
    if out.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({out.returncode}): {out.stderr[-2000:]}")
    ctor = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("CTOR ")]
    return wall, (ctor[0] if ctor else None), cpu


def measure(cmd: list[str], runs: int, env: dict | None = None) -> dict:
    walls, ctors, cpus = [], [], []
    for _ in range(runs):
        wall, ctor, cpu = run_once(cmd, env)
        walls.append(wall)
        cpus.append(cpu)
        if ctor is not None:
            ctors.append(ctor)
    out = {"wall_s_median": round(statistics.median(walls), 3), "wall_s_min": round(min(walls), 3),
           "wall_s": [round(w, 3) for w in walls], "cpu_s_median": round(statistics.median(cpus), 3)}
    if ctors:
        out.update(ctor_s_median=round(statistics.median(ctors), 3), ctor_s_min=round(min(ctors), 3))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--old-runs", type=int, default=1, help="runs of the uncached GGUF path (0: skip)")
    args = ap.parse_args()
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run_once([py, "-c", LLM_SNIPPET, "float32"], env)  # warm-up: converts the demo GGUF if not yet done
    cli = [py, "-m", "fnllm.cli", "generate", "--max-tokens", "1", "Hi"]
    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "runs": args.runs}
    # interleaved rounds, so that drift in the machine's load hits every figure alike
    figures = {"import_torch": ([py, "-c", "import torch"], env), "cli": (cli, env),
               "llm_float32": ([py, "-c", LLM_SNIPPET, "float32"], env),
               "llm_bfloat16": ([py, "-c", LLM_SNIPPET, "bfloat16"], env)}
    parts: dict[str, list[dict]] = {k: [] for k in figures}
    for _ in range(args.runs):
        for name, (cmd, e) in figures.items():
            parts[name].append(measure(cmd, 1, e))
    for name, got in parts.items():
        walls = [g["wall_s"][0] for g in got]
        res[name] = {"wall_s_median": round(statistics.median(walls), 3), "wall_s_min": round(min(walls), 3),
                     "cpu_s_median": round(statistics.median(g["cpu_s_median"] for g in got), 3)}
        ctors = [g["ctor_s_median"] for g in got if "ctor_s_median" in g]
        if ctors:
            res[name].update(ctor_s_median=round(statistics.median(ctors), 3), ctor_s_min=round(min(ctors), 3))
    if args.old_runs:
        old_env = dict(env, FNLLM_GGUF_CACHE="0")
        res["llm_uncached_gguf_float32"] = measure([py, "-c", LLM_SNIPPET, "float32"], args.old_runs, old_env)
    torch_s = res["import_torch"]["wall_s_median"]
    res["cli_minus_import_torch_s"] = round(res["cli"]["wall_s_median"] - torch_s, 3)
    res["llm_minus_import_torch_s"] = round(res["llm_float32"]["wall_s_median"] - torch_s, 3)
    res["targets"] = {"cli_wall_s": 2.0, "llm_ctor_s": 1.5,
                      "cli_met": res["cli"]["wall_s_median"] <= 2.0,
                      "llm_ctor_met": res["llm_float32"]["ctor_s_median"] <= 1.5}
    if "llm_uncached_gguf_float32" in res:
        res["speedup_ctor_vs_uncached"] = round(
            res["llm_uncached_gguf_float32"]["ctor_s_median"] / res["llm_float32"]["ctor_s_median"], 2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
