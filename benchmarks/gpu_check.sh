#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine whose python3 already has torch, torchvision, numpy,
# scipy, scikit-learn, pillow, pyyaml, tqdm, matplotlib and pytest (+ pytest-xdist). From the repo root:
#   OUT=/some/folder bash benchmarks/gpu_check.sh
# 1. the whole test suite with DUALREF_TEST_DEVICE=cuda (device-aware tests run on the GPU: AMP,
#    channels-last, k-NN / Jaccard, spread-out, extraction);
# 2. benchmarks/bench_gpu.py: Jaccard on the GPU and the training steps in fp32 / bf16 / fp16;
# 3. the demo end to end on CUDA with bf16 (--quick); 4. the full demo likewise.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  | tee -a "$OUT/gpu.txt"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
DUALREF_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -ra -p no:cacheprovider $workers tests \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/gpu.txt"
tail -15 "$OUT/pytest.log"
timeout 300 python3 benchmarks/bench_gpu.py --runs 3 --iters 20 --out "$OUT/bench_gpu.json" \
  > "$OUT/bench_gpu.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/gpu.txt"
tail -45 "$OUT/bench_gpu.log"
start=$(date +%s)
timeout 180 python3 -m dualref demo --quick --device cuda --amp bf16 --out /tmp/demo_cuda > "$OUT/demo.log" 2>&1
echo "demo rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
tail -12 "$OUT/demo.log"
# 4. the full demo on CUDA with bf16 (the README's main command; 4-7 min on the 2-core CPU machine).
start=$(date +%s)
timeout 200 python3 -m dualref demo --device cuda --amp bf16 --out /tmp/demo_cuda_full > "$OUT/demo_full.log" 2>&1
echo "full demo rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
tail -8 "$OUT/demo_full.log"
