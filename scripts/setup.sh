#!/usr/bin/env bash
# Create (or reuse) .venv with vLLM's CPU build, the trainer side and this package.
# Idempotent: a second run only re-installs this package. Needs Python 3.11 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
source scripts/env.sh

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# pip warns once per package about this machine's local index mirrors; keep the rest of stderr.
pip_q() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
DEPS="$VLLM_SPEC transformers tokenizers safetensors pytest pytest-xdist syrupy psutil numpy matplotlib"
# Re-install when the dependency list changes, not on every run.
stamp="$VENV/.rlparity-installed-$(echo "$DEPS" | md5sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing $VLLM_SPEC and the trainer side into $VENV (a few minutes the first time)"
  # shellcheck disable=SC2086
  pip_q $DEPS
  # PyPI's CUDA builds of these come along and break `import transformers` beside torch+cpu.
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$VENV/bin/python" -c "import vllm, transformers, torch" >/dev/null 2>&1 || {
    echo "setup: the environment in $VENV does not import vllm/transformers/torch" >&2; exit 1; }
  touch "$stamp"
fi
pip_q --no-deps -e .
