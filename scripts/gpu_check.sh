#!/usr/bin/env bash
# CUDA + bfloat16 check of the edit pipeline (< 5 minutes on one GPU).
# Runs the GPU-marked tests, then train-editor -> apply -> evaluate on the embedded
# world with --device cuda --dtype bfloat16, and prints the results beside a float32
# CUDA evaluation of the same editor. Usage: bash scripts/gpu_check.sh [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
STEPS=${1:-1500}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export KVTOOL_RUNS="$OUT"

echo "== GPU-marked tests ==" >&2
"$BIN/pytest" -q -m gpu tests/unit/edit tests/cli/edit

echo "== train-editor --device cuda --dtype bfloat16 ($STEPS steps) ==" >&2
time "$BIN/kvtool" edit train-editor --device cuda --dtype bfloat16 --steps "$STEPS" \
  --out "$OUT/editor.safetensors" --json --quiet | tee "$OUT/train.json"

echo "== apply (bfloat16 on cuda) ==" >&2
"$BIN/kvtool" edit apply --editor "$OUT/editor.safetensors" --device cuda --dtype bfloat16 \
  --out "$OUT/edited-model" --overwrite --json --quiet > "$OUT/apply.json"
"$BIN/python" - "$OUT/apply.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"apply: {r['n_edits']} edits, editing step {r['edit_seconds']}s, "
      f"mean p_pre {r['mean_p_pre']:.3f} -> p_post {r['mean_p_post']:.3f}, acc_post {r['acc_post']:.3f}")
PY

for dtype in bfloat16 float32; do
  echo "== evaluate on cuda, $dtype ==" >&2
  "$BIN/kvtool" edit evaluate --editor "$OUT/editor.safetensors" --device cuda --dtype "$dtype" --json --quiet \
    > "$OUT/eval_$dtype.json"
  "$BIN/python" - "$OUT/eval_$dtype.json" "$dtype" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for task, v in [*r["tasks"].items(), ("overall", r["overall"])]:
    cells = "  ".join(f"{k[:4]}={v[k]:.3f}" if v[k] is not None else f"{k[:4]}=-"
                      for k in ("reliability", "generalization", "locality", "portability"))
    print(f"{sys.argv[2]:9s} {task:12s} {cells}  n={v['n_records']}")
PY
done
