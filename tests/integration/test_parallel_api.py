"""The parallel front door: device -> collective backend (HCCL through the
torch_npu stand-in), the LLM and CLI arguments and their errors (raised before
any worker starts), and the single-process path staying the plain ModelExecutor."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fnllm import distributed
from fnllm.device.executor import ModelExecutor
from fnllm.executor.uniproc import UniProcExecutor
from fnllm.llm import LLM

REPO = Path(__file__).resolve().parents[2]


def test_backend_follows_the_device():
    assert distributed.backend_for_device("npu") == "hccl"
    assert distributed.backend_for_device("cuda:1") == "nccl"
    assert distributed.backend_for_device(torch.device("cpu")) == "gloo"
    with pytest.raises(ValueError, match="no collective backend for device 'tpu'"):
        distributed.backend_for_device("tpu")


def test_npu_rank_joins_with_hccl_on_its_device(fake_torch_npu, monkeypatch):
    """With torch_npu (here its stand-in) an NPU rank sets its device and joins with hccl."""
    try:
        torch.device("npu")
    except RuntimeError:  # what `import torch_npu` does: name the PrivateUse1 device "npu"
        torch.utils.rename_privateuse1_backend("npu")
    calls = []
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(set_device=lambda i: calls.append(("set_device", i))),
                        raising=False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    monkeypatch.setattr(distributed.dist, "new_group", lambda ranks: ("group", tuple(ranks)))
    g = distributed.init_distributed(1, 2, "tcp://127.0.0.1:1", tp_size=2, pp_size=1, device="npu", local_rank=1)
    assert calls == [("set_device", 1), ("init", "hccl")]
    assert g.device == torch.device("npu", 1) and g.tp_group == ("group", (0, 1)) and g.tp_rank == 1


def test_world_size_one_is_the_plain_executor(tiny_pangu):
    from fnllm.config import ParallelConfig
    from fnllm.executor import make_executor

    with make_executor(str(tiny_pangu[0]), ParallelConfig(), device="cpu", num_blocks=8) as ex:
        assert type(ex) is UniProcExecutor and isinstance(ex, ModelExecutor) and ex.world_size == 1
        assert ex.worker_stats()[0]["kv_heads"] == 2
    assert ex.model is None  # shut down on leaving the block


@pytest.mark.parametrize("kw,match", [
    (dict(tensor_parallel_size=3), "4 attention heads are not divisible by tensor_parallel_size 3"),
    (dict(pipeline_parallel_size=3), "pipeline_parallel_size 3 exceeds the model's 2 layers"),
    (dict(distributed_executor_backend="mpi"), "distributed_executor_backend must be one of"),
    (dict(tensor_parallel_size=2, distributed_executor_backend="uni"), "'uni' runs one process"),
])
def test_llm_rejects_layouts_before_starting_workers(tiny_pangu, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_pangu[0]), device="cpu", num_kv_blocks=8, **kw)


def test_cli_parallel_flags(tiny_pangu):
    from fnllm.cli import build_parser

    args = build_parser().parse_args(["generate", "x", "-tp", "2", "-pp", "2", "--distributed-executor-backend", "ray"])
    assert (args.tensor_parallel_size, args.pipeline_parallel_size, args.distributed_executor_backend) == (2, 2, "ray")
    proc = subprocess.run(
        [sys.executable, "-m", "fnllm.cli", "generate", "hello", "--model", str(tiny_pangu[0]), "--device", "cpu",
         "--tensor-parallel-size", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "fnllm: error: the model's 4 attention heads are not divisible by tensor_parallel_size 3" in proc.stderr
