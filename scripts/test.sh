#!/usr/bin/env bash
# Install what is needed, then run the test suite (unit, API and integration tests).
# Extra arguments go to pytest, e.g. scripts/test.sh -k images -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
[ $rc -eq 5 ] && { echo "no tests ran"; exit 1; }
exit $rc
