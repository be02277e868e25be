#!/usr/bin/env bash
# The main job: the built-in parity suite on the embedded tiny model, real vLLM on CPU.
# Extra arguments go to pytest, e.g. --rlparity-engine-kwarg logprobs_mode=raw_logprobs
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest --rlparity "$@"
