#!/usr/bin/env bash
# The GPU path in one run, on a machine with a CUDA GPU (CI is CPU-only and never runs it):
#   1. the tests with CUDA variants: 4-bit (nf4) and bf16 generate() on the GPU equal plain LLaVA's, bf16 fusers
#      within tolerance of float32 (tests/test_quantization.py, `cuda` in their names);
#   2. bench_fuser.py on the GPU in bf16 at LLaVA-1.5-7B's shape, all 32 decoder layers (random weights);
#   3. vLLM's CUDA build (.ci/vllm-gpu, .venv-vllm-gpu/) serving fused checkpoints with transformers' greedy tokens
#      (tests_vllm/; tensor parallel 2 only with two GPUs), then bench_vllm.py (interleaved rounds, 4 minutes).
# It needs .venv/ with a CUDA torch: `./dev.sh setup` on a Linux CUDA machine installs PyPI's torch, a CUDA build.
# Results go to GPU_CHECK_OUTPUT (default gpu-check/): the JSONs and one log per step.
#     bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${VIRTUAL_ENV:-.venv}/bin/python"
output=${GPU_CHECK_OUTPUT:-gpu-check}
if [ ! -x "$python" ]; then
  echo "gpu_check.sh: no $python here; run ./dev.sh setup first (on the CUDA machine)" >&2
  exit 2
fi
"$python" -c 'import sys, torch; torch.cuda.is_available() or sys.exit(
    f"gpu_check.sh: torch {torch.__version__} sees no CUDA GPU; install a CUDA build of torch into .venv/ "
    "(./dev.sh setup without TORCH_INDEX_URL on a Linux CUDA machine)")'
mkdir -p "$output"
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')

step() {
  local name=$1
  shift
  echo "== $name"
  local start=$SECONDS
  "$@" 2>&1 | tee "$output/$name.log"
  echo "== $name: $((SECONDS - start)) s"
}

step cuda-tests "$python" -m pytest -q -p no:cacheprovider tests/test_quantization.py -k cuda -rs
step bench-fuser "$python" benchmarks/bench_fuser.py --device cuda --dtype bfloat16 --llm-layers 32 \
  --json "$output/bench_fuser_cuda.json"
# The refusal of head size 16 is the CPU attention's; tensor parallel 2 needs two GPUs.
deselect="not refuses_a_head_size"
[ "$gpus" -ge 2 ] || deselect="$deselect and not -2]"
step vllm-tests bash .ci/vllm-gpu -k "$deselect"
step bench-vllm .venv-vllm-gpu/bin/python benchmarks/bench_vllm.py --vllm-llava --minutes 4 --json "$output/bench_vllm_cuda.json"
