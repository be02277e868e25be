#!/usr/bin/env bash
# The project's own tests, including real vLLM runs on CPU: two pytest-xdist workers (tests sharing an
# engine are one xdist group); pass -n 0 to run them in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -n 2 --dist loadgroup "$@"
