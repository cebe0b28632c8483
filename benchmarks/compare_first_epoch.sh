#!/usr/bin/env bash
# Issue 9's behaviour check: the first adaptation epoch of configs/cpu/duke_to_market/full.yaml run by two
# checkouts of dualref (e.g. before and after a refactoring) must log the same loss values.
#   benchmarks/compare_first_epoch.sh OLD_TREE NEW_TREE OUT_DIR
# Each tree's src/ is put first on PYTHONPATH; both use the source model runs/cpu_pretrain_duke/checkpoint.pt
# of this checkout. The runs stop once epoch 1 is logged (no evaluation); the loss_* values are compared.
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); out=$(realpath -m "$3")
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
run() {  # tree name
    local tree=$1 name=$2
    (cd "$tree" && PYTHONPATH="$tree/src" "$here/.venv/bin/python" -m dualref adapt configs/cpu/duke_to_market/full.yaml \
        --set source_checkpoint="$here/runs/cpu_pretrain_duke/checkpoint.pt" \
        --set data.target_root="$here/../shared/data/Market-1501" \
        --set optim.epochs=2 --set run.eval_every=0 --set run.progress=false \
        --set run.run_dir="$out/$name" >"$out/$name.out" 2>&1) &
    local pid=$!
    until grep -q '"kind": "adapt"' "$out/$name/metrics.jsonl" 2>/dev/null; do
        kill -0 $pid 2>/dev/null || { echo "$name stopped early: $out/$name.out"; exit 1; }
        sleep 10
    done
    pkill -P $pid || true; kill $pid 2>/dev/null || true
}
run "$old" old & run "$new" new & wait
"$here/.venv/bin/python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
records = {n: next(json.loads(l) for l in (out / n / "metrics.jsonl").read_text().splitlines()
                   if json.loads(l)["kind"] == "adapt") for n in ("old", "new")}
keys = sorted(k for k in records["old"] if k.startswith("loss_") or k in ("eps", "num_clusters", "num_outliers"))
width = max(map(len, keys))
same = True
for key in keys:
    a, b = records["old"][key], records["new"].get(key)
    same &= a == b
    print(f"{key:<{width}}  {a!r:>22}  {b!r:>22}  {'same' if a == b else 'DIFFERENT'}")
print("identical" if same else "DIFFERENT")
PY
