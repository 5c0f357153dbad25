#!/usr/bin/env bash
# The test suite (default CPU tier; GPU tests are skipped without CUDA; the 30 slowest tests are listed at the end).
# Extra args go to pytest; a later -m replaces the default selection, e.g. `-m extended` for the long CPU variants.
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=$(bash scripts/setup_env.sh) || exit 1
"$VPY" -m pytest -m "not gpu and not extended" -p no:cacheprovider --durations=30 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
