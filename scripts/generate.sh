#!/usr/bin/env bash
# Set up (once) and answer a prompt with the embedded default model, streaming to the terminal.
#   bash scripts/generate.sh "What is the capital of France?" [more mnemosyne generate flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
prompt="${1:-What is the capital of France?}"
shift || true
exec "${MNEMOSYNE_VENV:-.venv}/bin/mnemosyne" generate --prompt "$prompt" "$@"
