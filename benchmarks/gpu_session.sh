#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one command each, for a GPU machine without network access.
# Logs and JSON go under $OUT (default runs/gpu).
#
#   bash benchmarks/gpu_session.sh ceiling   # 1 GPU: step_profile at one rank's batch (8) and the global one (16)
#   bash benchmarks/gpu_session.sh ddp       # 2+ GPUs: NCCL all-reduce, then DDP vs one GPU with the ceiling
#   bash benchmarks/gpu_session.sh tests     # pytest -m gpu (every GPU-marked test)
#
# Before, where the package index is reachable, fill two git-ignored folders in the checkout: .whl/ with wheels of
# what the GPU machine lacks (for Python 3.12: hydra-core, omegaconf 2.3, antlr4-python3-runtime 4.9.3,
# liger-kernel) and .gpu-cache/ with the mamba-ssm source and build-kernels.sh (shared/gpu/). Both are used when
# present: the wheels go to /tmp/site, mamba-ssm is built for this GPU only (about 3 minutes).
set -uo pipefail
case "${1:-}" in
  ceiling | ddp | tests) ;;
  *) echo "usage: bash benchmarks/gpu_session.sh ceiling|ddp|tests (got '${1:-}')" >&2; exit 2 ;;
esac
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
# NVLink multicast stays off on shared hosts
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1  # a second process reuses mamba-ssm's autotuning
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
SECONDS=0
if [ -f .gpu-cache/build-kernels.sh ] && ! python3 -c 'import mamba_ssm' 2> /dev/null; then
  bash .gpu-cache/build-kernels.sh .gpu-cache > "$OUT/build.log" 2>&1
  echo "mamba-ssm build: exit $? in ${SECONDS}s"
fi
graphs=(--set trainer.compile=true --set trainer.compile_mode=reduce-overhead)
case "$1" in
  ceiling)
    for batch in 16 8; do
      python3 benchmarks/step_profile.py --graphs --batch "$batch" --steps 60 > "$OUT/profile-b$batch.json" \
        2> "$OUT/profile-b$batch.log"
      echo "step_profile batch $batch: exit $? at ${SECONDS}s"; cat "$OUT/profile-b$batch.json"
    done ;;
  ddp)
    n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
    python3 benchmarks/allreduce.py --devices "$n" > "$OUT/allreduce.json" 2> "$OUT/allreduce.log"
    echo "allreduce: exit $? at ${SECONDS}s"; cat "$OUT/allreduce.json"
    python3 benchmarks/multi_gpu.py ddp --devices "$n" --ceiling --steps 50 "${graphs[@]}" > "$OUT/ddp.json" \
      2> "$OUT/ddp.log"
    echo "ddp: exit $? at ${SECONDS}s"; cat "$OUT/ddp.json" ;;
  tests)
    python3 -m pytest -m gpu -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
    echo "pytest -m gpu: exit $? at ${SECONDS}s"; tail -20 "$OUT/tests.log" ;;
esac
