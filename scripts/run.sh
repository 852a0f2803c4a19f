#!/usr/bin/env bash
# Set up (idempotent) and generate real text with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  set -- generate --chat "What is the capital of France?"
fi
exec .venv/bin/fnllm "$@"
