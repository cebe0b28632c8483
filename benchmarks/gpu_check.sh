#!/usr/bin/env bash
# The GPU checks, in one run on a CUDA machine whose python3 already has torch, torchvision, numpy,
# scipy, scikit-learn, pillow, pyyaml, tqdm, matplotlib and pytest (+ pytest-xdist). From the repo root:
#   OUT=/some/folder bash benchmarks/gpu_check.sh
# 1. the whole test suite with DUALREF_TEST_DEVICE=cuda (device-aware tests run on the GPU: AMP,
#    channels-last, k-NN / Jaccard, spread-out, extraction);
# 2. benchmarks/bench_gpu.py: Jaccard on the GPU and the training steps in fp32 / bf16 / fp16;
# 3. the demo end to end on CUDA with bf16 (--quick); 4. the full demo likewise; 5. with 2 GPUs or more, a
#    2-rank NCCL adaptation against one process (on one GPU it says so).
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
# 5. several GPUs (issue 12): the full demo's Dual-Refinement run again, 2 epochs, as 2 NCCL ranks and as
#    one process with ghost BN over 2 groups (docs/distributed.md: the same statistics); compares the
#    per-epoch losses and clusters, and the times.
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
demo_config=/tmp/demo_cuda_full/dual_refinement/config.yaml
if [ "$ngpu" -lt 2 ]; then
  echo "several GPUs: skipped, this machine has $ngpu GPU(s); the 2-rank NCCL check needs 2" | tee -a "$OUT/gpu.txt"
elif [ ! -f "$demo_config" ]; then
  echo "several GPUs: skipped, the full demo (step 4) did not finish" | tee -a "$OUT/gpu.txt"
else
  sets="--set optim.epochs=2 --set run.device=cuda --set run.eval_every=0"
  rm -rf /tmp/ddp_two /tmp/ddp_one
  start=$(date +%s)
  timeout 300 torchrun --nproc_per_node=2 -m dualref adapt "$demo_config" $sets --set run.run_dir=/tmp/ddp_two \
    > "$OUT/ddp_two.log" 2>&1
  echo "2 NCCL ranks rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
  start=$(date +%s)
  timeout 300 python3 -m dualref adapt "$demo_config" $sets --set model.bn_groups=2 --set run.run_dir=/tmp/ddp_one \
    > "$OUT/ddp_one.log" 2>&1
  echo "1 process, bn_groups=2 rc=$? $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"
  python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import json
for name in ("two", "one"):
    try:
        lines = open(f"/tmp/ddp_{name}/metrics.jsonl").read().splitlines()
    except OSError as err:
        print(f"{name}: no metrics ({err})")
        continue
    for record in map(json.loads, lines):
        if record["kind"] in ("adapt", "eval_target"):
            keys = ("loss_total", "num_clusters", "seconds_train", "seconds_extract", "mAP")
            print(name, record["epoch"], record["kind"], {k: record[k] for k in keys if k in record})
PY
fi
