#!/usr/bin/env bash
# CI's upstream report (`make upstream-report`): the pin vs the newest megatron-core release on
# the package index. Writes out/upstream-report.md and prints a one-line summary.
# Fails ONLY when the pinned series no longer applies to the pin (zero fuzz, lock hashes,
# refresh no-op): upstream moving on, a patch that would need porting, or a breaking API change
# at the newest release are reported, not failures. Works without the Megatron-LM submodule
# (core-only: both sides from the package index), which is how CI runs.
# Env: PYTHON (default .venv/bin/python, else python3), OUT (default out/upstream-report.md),
#      TO (default: latest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT="${OUT:-out/upstream-report.md}"
TO="${TO:-latest}"
set +e
"$PY" tools/diff_report.py --to "$TO" --out "$OUT" --check-pin
rc=$?
set -e
if [ $rc -ne 0 ]; then
  echo "upstream-report: FAILED (rc=$rc): the pinned patch series does not apply to the pin," >&2
  echo "  or the report could not be produced; see the messages above." >&2
  exit $rc
fi
echo "upstream-report: OK (report in $OUT)"
