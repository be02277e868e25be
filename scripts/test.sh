#!/usr/bin/env bash
# The project's own tests, including real vLLM runs on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
