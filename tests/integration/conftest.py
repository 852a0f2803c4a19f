"""Session fixtures: tiny checkpoints written once, the demo model loaded once.

The demo GGUF is never downloaded here: CI fetches it first
(``python -m fnllm.model.fetch``); a missing file fails with that advice.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from integration_support import LLAMA, PANGU, reference_model, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pangu(tmp_path_factory):
    """(checkpoint dir, transformers reference model) for a 2-layer Pangu."""
    model = reference_model(PANGU, seed=1)
    return write_checkpoint(tmp_path_factory.mktemp("pangu"), PANGU, model), model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    model = reference_model(LLAMA, seed=2)
    return write_checkpoint(tmp_path_factory.mktemp("llama"), LLAMA, model), model


@pytest.fixture(scope="session")
def smollm2_path():
    from fnllm.model.fetch import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    """The demo model behind one ``LLM``, loaded once for every module that
    builds its own engines over its executor (the executor keeps no
    per-request state)."""
    from fnllm.llm import LLM

    return LLM(str(smollm2_path), dtype="float32", device="cpu", num_kv_blocks=512, max_model_len=1024, seed=0)


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """Install the stand-in as ``torch_npu`` for one test."""
    import fake_torch_npu as fake

    fake.calls.clear()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    return fake
