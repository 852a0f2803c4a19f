"""The disk KV tier across processes (tiny checkpoints, CPU): a second
process finds the first one's blocks; corrupt and foreign files are never
served (removed, recomputed, same tokens); the directory stays bounded."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from fnllm.device.executor import ModelExecutor
from fnllm.device.kv_disk import MAGIC, DiskKV
from fnllm.offload import replay_stager
from fnllm.replay import verify, verify_device
from fnllm.trace import read_trace

ROOT = pathlib.Path(__file__).parents[2]
WORKER = pathlib.Path(__file__).with_name("disk_tier_worker.py")


def serve(checkpoint, directory, trace=None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    extra = [str(trace)] if trace else []
    out = subprocess.run([sys.executable, str(WORKER), str(checkpoint), str(directory)] + extra, capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_starts_with_the_system_prompt_cached(tiny_llama, tiny_pangu, tmp_path):
    llama, _ = tiny_llama
    first = serve(llama, tmp_path)
    assert first["cached"][0] == 0 and first["staged"] == 0
    files = sorted(pathlib.Path(first["dir"]).glob("*.kv"))
    assert len(files) == 46 // 4  # r0's 11 full prompt blocks (r1's 10 are the shared ones)

    second = serve(llama, tmp_path, tmp_path / "second.jsonl")
    assert second["tokens"] == first["tokens"]
    trace = read_trace(str(tmp_path / "second.jsonl"))
    assert [e for e in trace.events if e["type"] == "stage"], "disk reads are input events of the trace"
    assert verify(trace) is None, "replay reproduces the disk hits (staging and swap_in)"
    assert second["cached"][0] >= 40, "the system prompt's full blocks came from disk"
    assert second["staged"] >= 10 and second["swapped_in"] >= 10 and second["rejected"] == 0
    # `fnllm replay --device` re-executes it, re-reading the staged blocks from the directory
    out = subprocess.run([sys.executable, "-m", "fnllm.cli", "replay", str(tmp_path / "second.jsonl"), "--device", "cpu",
                          "--kv-offload-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert out.returncode == 0 and "reproduced" in out.stdout, out.stdout + out.stderr[-2000:]

    # a corrupted block file is detected, removed, recomputed (and written again)
    victim = files[len(files) // 2]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    third = serve(llama, tmp_path)
    assert third["tokens"] == first["tokens"]
    assert third["rejected"] == 1
    assert not victim.exists() or victim.read_bytes() != bytes(data)

    # another model: its own directory; llama's files planted there are never served
    pangu, _ = tiny_pangu
    alone = serve(pangu, tmp_path / "fresh")
    other_dir = pathlib.Path(alone["dir"].replace(str(tmp_path / "fresh"), str(tmp_path)))
    other_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        if f.exists():
            shutil.copy(f, other_dir / f.name)
    foreign = serve(pangu, tmp_path)
    assert foreign["tokens"] == alone["tokens"]
    assert foreign["staged"] == 0 and foreign["rejected"] >= 1


def test_replay_reexecutes_disk_hits(tiny_llama, tmp_path, capsys):
    """A run whose prompt blocks came from disk: the stage events and swap-ins
    are in the trace, the pure replay reproduces every plan and state, and a
    device replay that re-reads the same files reproduces every token (one
    that fills the staged blocks with anything else does not)."""
    import disk_tier_worker as worker

    llama, _ = tiny_llama
    worker.main(str(llama), str(tmp_path))
    trace_path = tmp_path / "second.jsonl"
    worker.main(str(llama), str(tmp_path), str(trace_path))
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["staged"] >= 10
    trace = read_trace(str(trace_path))
    stages = [e for e in trace.events if e["type"] == "stage"]
    assert sum(e["count"] for e in stages) == second["staged"]
    swapped_in = sum(len(e["rows"].get("swap_in", [])) for e in trace.events if e["type"] == "step")
    assert swapped_in >= second["staged"], "the staged blocks come in by the plans' swap_in"
    assert verify(trace) is None

    def executor():
        return ModelExecutor(str(llama), num_blocks=64, block_size=4, device="cpu", num_host_blocks=32)

    ex = executor()
    with pytest.raises(ValueError, match="disk tier"):
        verify_device(trace, ex)
    assert verify_device(trace, ex, on_stage=replay_stager(ex, str(tmp_path))) is None
    assert ex.host_kv.swapped_in >= second["staged"]

    wrong = executor()

    def zeros(state, event, host_blocks):
        for hb in host_blocks:
            wrong.host_kv.write(hb, torch.zeros_like(wrong.host_kv.read_device_block(wrong.kv_caches, 0)))

    assert verify_device(trace, wrong, on_stage=zeros) is not None, "the replay really uses the staged bytes (logprobs differ)"


def test_disk_kv_checks_every_file_and_stays_bounded(tmp_path):
    shape, dtype = (2, 2, 4, 1, 8), torch.bfloat16
    per_file = torch.empty(shape, dtype=dtype).numel() * 2 + len(MAGIC) + 104
    disk = DiskKV(str(tmp_path), b"A" * 32, 3 * per_file, shape, dtype)
    blocks = {bytes([k]) * 32: torch.randn(shape).to(dtype) for k in range(5)}
    for h, kv in blocks.items():
        disk.submit(h, kv)
    disk.flush()
    kept = sorted(p.name for p in pathlib.Path(disk.dir).glob("*.kv"))
    assert len(kept) == 3 and disk.num_bytes <= 3 * per_file  # least recently written went first
    last = list(blocks)[-1]
    assert torch.equal(disk.read(last), blocks[last])
    assert disk.read(list(blocks)[0]) is None
    # a file of another model, renamed into this directory, is refused and removed
    other = DiskKV(str(tmp_path / "b"), b"B" * 32, 1 << 20, shape, dtype)
    other.submit(b"\x09" * 32, blocks[last])
    other.flush()
    planted = pathlib.Path(disk.dir) / ((b"\x09" * 32).hex() + ".kv")
    shutil.copy(pathlib.Path(other.dir) / planted.name, planted)
    fresh = DiskKV(str(tmp_path), b"A" * 32, 3 * per_file, shape, dtype)  # a new process scans the directory
    assert fresh.read(b"\x09" * 32) is None and not planted.exists() and fresh.rejected == 1
    # a truncated file likewise
    victim = pathlib.Path(fresh.dir) / (last.hex() + ".kv")
    victim.write_bytes(victim.read_bytes()[:-10])
    assert fresh.read(last) is None and not victim.exists()
    for d in (disk, other, fresh):
        d.close()
