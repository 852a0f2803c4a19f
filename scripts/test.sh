#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite with the CI hypothesis profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collects no test: that is a failure here, not a pass
[ "$rc" -eq 5 ] && echo "no tests were collected" >&2 && exit 1
exit "$rc"
