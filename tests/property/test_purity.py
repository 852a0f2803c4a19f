"""Invariant 13: equal inputs give equal outputs and the input is unchanged;
and the core imports with torch (and numpy) blocked."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from fnllm.lifecycle import abort_request, add_request
from fnllm.schedule import schedule
from fnllm.state import Request
from fnllm.step import commit
from tests.property.invariants import Run, snapshot
from tests.property.strategies import engine_configs, prompts, sampling_params

CORE = ("config", "state", "blocks", "lifecycle", "faults", "schedule", "step", "invariants", "trace", "spec")
FORBIDDEN = {"torch", "numpy", "time", "random", "threading", "logging"}


def _started(config, work) -> Run:
    """A run with one request ``r{i}`` per (prompt, sampling) in ``work``."""
    run = Run(config)
    for i, (p, sp) in enumerate(work):
        run.add(Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp))
    return run


@given(
    config=engine_configs(),
    work=st.lists(st.tuples(prompts(), sampling_params()), min_size=1, max_size=4),
    steps=st.integers(0, 6),
)
def test_core_functions_are_pure(config, work, steps):
    run = _started(config, work)
    for _ in range(steps):
        run.step()
    s0 = run.state
    snap = snapshot(s0)
    a_state, a_plan = schedule(s0, config)
    b_state, b_plan = schedule(s0, config)
    assert snapshot(s0) == snap and a_plan == b_plan and snapshot(a_state) == snapshot(b_state)
    out = run.ex.execute(a_plan)
    mid = snapshot(a_state)
    c1 = commit(a_state, a_plan, out, config)
    c2 = commit(a_state, a_plan, out, config)
    assert snapshot(a_state) == mid and c1[1] == c2[1] and snapshot(c1[0]) == snapshot(c2[0])
    extra = Request(request_id="new", prompt_token_ids=(1, 2, 3))
    assert snapshot(add_request(s0, extra, config)) == snapshot(add_request(s0, extra, config))
    assert snapshot(s0) == snap
    abort_request(s0, "r0")
    assert snapshot(s0) == snap


def test_core_imports_with_torch_blocked():
    code = "import sys\nfor m in ('torch', 'numpy'):\n    sys.modules[m] = None\n" + "".join(
        f"import fnllm.{m}\n" for m in CORE if (pathlib.Path("fnllm") / f"{m}.py").exists()
    ) + "import fnllm.device.fake\nprint('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=pathlib.Path(__file__).parents[2])
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_core_sources_import_no_clock_randomness_or_device():
    root = pathlib.Path(__file__).parents[2] / "fnllm"
    for m in CORE:
        path = root / f"{m}.py"
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            bad = FORBIDDEN.intersection(names)
            assert not bad, f"fnllm/{m}.py imports {bad}"


@given(
    config=engine_configs(),
    work=st.lists(st.tuples(prompts(), sampling_params()), min_size=1, max_size=5),
    steps=st.integers(1, 12),
)
def test_decode_fast_path_agrees_with_general_path(config, work, steps):
    run = _started(config, work)
    for _ in range(steps):
        _check_decode_fast_path(run.state, config)
        run.step()


def _check_decode_fast_path(state, config) -> None:
    """Where ``_all_decode`` takes the step, ``schedule_general`` plans the same."""
    from fnllm.schedule import _all_decode, schedule_general

    fast = _all_decode(state, config)
    if fast is not None:
        slow = schedule_general(state, config)
        assert fast[1] == slow[1]
        assert snapshot(fast[0]) == snapshot(slow[0])


@given(
    config=engine_configs(window=False),
    work=st.lists(st.tuples(prompts(), sampling_params(), st.integers(0, 8)), min_size=2, max_size=6),
)
def test_decode_fast_path_agrees_with_general_path_under_arrivals(config, work):
    """Requests arriving while others decode: wherever ``_all_decode`` takes
    the step, it plans as ``schedule_general`` (and ``check_plan`` verifies
    the block-completing rows it notes for commit)."""
    run = Run(config)
    for step in range(12):
        for i, (p, sp, at) in enumerate(work):
            if at == step:
                run.add(Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp))
        _check_decode_fast_path(run.state, config)
        run.step()


@given(
    config=engine_configs(),
    work=st.lists(st.tuples(prompts(), sampling_params(), st.integers(0, 8)), min_size=2, max_size=6),
)
def test_column_wise_decode_rows_agree_with_the_row_loop(config, work):
    """Requests arriving while others decode: where the general path plans
    every running row's decode column-wise, the row-by-row loop plans the same."""
    from fnllm.schedule import _Step, schedule_general

    run = Run(config)
    for step in range(12):
        for i, (p, sp, at) in enumerate(work):
            if at == step:
                run.add(Request(request_id=f"r{i}", prompt_token_ids=p, sampling=sp))
        fast = schedule_general(run.state, config)
        column = _Step._decode_every_row
        _Step._decode_every_row = lambda self: False
        try:
            slow = schedule_general(run.state, config)
        finally:
            _Step._decode_every_row = column
        assert fast[1] == slow[1]
        assert snapshot(fast[0]) == snapshot(slow[0])
        run.step()


@given(
    config=engine_configs(),
    work=st.lists(st.tuples(prompts(), sampling_params()), min_size=1, max_size=5),
    steps=st.integers(1, 12),
)
def test_commit_fast_path_agrees_with_general_path(config, work, steps):
    """Where ``_commit_decode`` takes a step, the general ``_Commit`` gives the same state and news."""
    import fnllm.step as step_mod

    run = _started(config, work)
    taken = 0
    for _ in range(steps):
        mid, plan = schedule(run.state, config)
        out = run.ex.execute(plan) if plan.has_device_work else None
        if out is not None and plan.seq_ids == mid.running.seq_ids and len(plan):
            fast = step_mod._commit_decode(mid, plan, out, config) if plan.num_samples.count(1) == len(plan) else None
            if fast is not None:
                taken += 1
                slow_work = step_mod._Commit(mid, config)
                for r in step_mod._crossing(plan, config.cache.block_size) if config.cache.enable_prefix_caching else ():
                    slow_work.register_full_blocks(r, plan.positions[r], plan.positions[r] + len(plan.token_ids[r]))
                lps = None if out.logprobs is None else [x[0] if x else None for x in out.logprobs]
                slow_work.append_every_row([x[0] for x in out.sampled], lps)
                slow = slow_work.finish(out.logprobs is not None)
                assert snapshot(fast[0]) == snapshot(slow[0]) and fast[1] == slow[1]
        run.step()
