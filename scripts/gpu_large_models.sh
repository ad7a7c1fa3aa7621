#!/usr/bin/env bash
# Large-model check on one GPU (about 8 minutes): docs/large-models.md shows what it produced.
#
# 1. a LLaMA-2-7B-shaped model with random weights (random:llama-2-7b): train-editor for 20
#    steps with --device cuda --dtype bfloat16; peak CUDA memory and seconds per step;
# 2. the embedded world: an editor trained on CUDA in bfloat16 for STEPS steps, and REF_EDITOR
#    (the same settings trained on the CPU in float32), each evaluated on the test split on
#    cuda/bfloat16, and REF_EDITOR on cuda/float32 too; the CPU's own figures for REF_EDITOR
#    are REF_JSON (edit evaluate --json on the CPU).
#
# Usage: [PY=python3] [DEVICE=cuda] [BIG=random:llama-2-7b] [SKIP_BIG=1] [STEPS=1000] REF_EDITOR=path
#        [REF_JSON=path] bash scripts/gpu_large_models.sh
# DEVICE=cpu BIG=<small spec> is a dry run of this script on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
BIG=${BIG:-random:llama-2-7b}
STEPS=${STEPS:-1000}
OUT=${OUT:-runs/gpu_large}
mkdir -p "$OUT"
export KVTOOL_RUNS="$OUT/runs" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
kvtool() { "$PY" -m kedit_vfl "$@"; }
failed=0
step() { echo "== $* ($(date +%T)) ==" >&2; }

step "environment"
"$PY" - <<'PY'
import sys, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, {gpu}")
PY

if [[ -z "${SKIP_BIG:-}" ]]; then
step "train-editor --model $BIG --device $DEVICE --dtype bfloat16 --steps 20"
start=$(date +%s)
timeout "${BIG_TIMEOUT:-330}" "$PY" -m kedit_vfl edit train-editor --model "$BIG" --device "$DEVICE" \
  --dtype bfloat16 --steps 20 --val-every 20 --val-records 4 --memory-edits 8 \
  --out "$OUT/editor-big.safetensors" --json --quiet > "$OUT/train_big.json" || failed=1
echo "took $(($(date +%s) - start)) s" >&2
"$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("big:", r["resources"], r["validation"])' \
  "$OUT/train_big.json" || failed=1
rm -f "$OUT/editor-big.safetensors" "$OUT"/editor-big.ckpt.safetensors
fi

step "train-editor on the embedded world --device $DEVICE --dtype bfloat16 --steps $STEPS"
start=$(date +%s)
kvtool edit train-editor --device "$DEVICE" --dtype bfloat16 --steps "$STEPS" \
  --out "$OUT/editor-embedded.safetensors" --json --quiet > "$OUT/train_embedded.json" || failed=1
echo "took $(($(date +%s) - start)) s" >&2

evaluate() { # label editor dtype
  kvtool edit evaluate --editor "$2" --device "$DEVICE" --dtype "$3" --json --quiet >"$OUT/eval_$1.json" || {
    failed=1
    return
  }
  "$PY" - "$OUT/eval_$1.json" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for task, v in [*r["tasks"].items(), ("overall", r["overall"])]:
    cells = "  ".join(f"{k[:4]}={v[k]:.3f}" if v[k] is not None else f"{k[:4]}=-"
                      for k in ("reliability", "generalization", "locality"))
    print(f"{sys.argv[2]:28s} {task:12s} {cells}  n={v['n_records']}")
PY
}
step "evaluate on $DEVICE"
evaluate "trained-${DEVICE}-bf16_on_${DEVICE}-bf16" "$OUT/editor-embedded.safetensors" bfloat16
if [[ -n "${REF_EDITOR:-}" ]]; then
  evaluate "trained-cpu-f32_on_${DEVICE}-bf16" "$REF_EDITOR" bfloat16
  evaluate "trained-cpu-f32_on_${DEVICE}-f32" "$REF_EDITOR" float32
fi
[[ -n "${REF_JSON:-}" ]] && cp "$REF_JSON" "$OUT/eval_trained-cpu-f32_on_cpu-f32.json"
exit $failed
