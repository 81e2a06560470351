#!/usr/bin/env bash
# Set up (once, with test tools) and run the test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec "${MNEMOSYNE_VENV:-.venv}/bin/python" -m pytest -q "$@"
