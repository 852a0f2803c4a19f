"""A killed kernel build's lock is cleared; a live build's is left alone."""

import os
import time

from fnllm.device import cpu_kernels


def _lock(tmp_path, monkeypatch, age_s):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "fnllm_cpu_kernels" / "lock"
    lock.parent.mkdir()
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_stale_lock_is_removed(tmp_path, monkeypatch):
    lock = _lock(tmp_path, monkeypatch, cpu_kernels._STALE_LOCK_S + 60)
    cpu_kernels._clear_stale_lock()
    assert not lock.exists()


def test_fresh_lock_is_kept(tmp_path, monkeypatch):
    lock = _lock(tmp_path, monkeypatch, 5)
    cpu_kernels._clear_stale_lock()
    assert lock.exists()
