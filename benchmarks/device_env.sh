# Sourced by the device scripts: output folder, quiet unbuffered Python, and the carried wheels
# (pyzmq, fastapi, … that the GPU image lacks) installed into a scratch site first on PYTHONPATH.
out="${OUT:-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MNEMOSYNE_QUIET=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then  # once per machine: jobs running side by side import from this site
  [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; } || exit 1
  export PYTHONPATH="/tmp/site:src:."
else
  export PYTHONPATH="src:."
fi
