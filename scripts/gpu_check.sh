#!/usr/bin/env bash
# CUDA + bfloat16 check of the edit pipeline (about 5 minutes on one GPU).
#
# 1. the GPU-marked tests;
# 2. train-editor on the embedded defaults with --device cuda --dtype bfloat16;
# 3. apply with that editor on cuda/bfloat16;
# 4. evaluate that editor on cuda/bfloat16, cuda/float32 and cpu/float32, and, when REF_EDITOR
#    names an editor trained on the CPU (float32), that one on cuda/bfloat16 and cpu/float32,
#    so the training device and the evaluation device/dtype can be told apart.
#
# Usage: [PY=python3] [DEVICE=cuda] [STEPS=N] [REF_EDITOR=path] bash scripts/gpu_check.sh
# PY is the interpreter that has kedit_vfl importable (default: the project's .venv).
# DEVICE=cpu runs the same steps on the CPU (a dry run of this script on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export KVTOOL_RUNS="$OUT"
kvtool() { "$PY" -m kedit_vfl "$@"; }
failed=0
step() { echo "== $* ==" >&2; }

step "environment"
"$PY" - <<'PY'
import sys, torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, {gpu}")
PY

step "GPU-marked tests"
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/unit/edit tests/cli/edit || failed=1

steps_args=()
[[ -n "${STEPS:-}" ]] && steps_args=(--steps "$STEPS")
step "train-editor --device $DEVICE --dtype bfloat16 ${STEPS:+--steps $STEPS}"
start=$(date +%s)
kvtool edit train-editor --device "$DEVICE" --dtype bfloat16 "${steps_args[@]}" \
  --out "$OUT/editor.safetensors" --json --quiet > "$OUT/train.json" || failed=1
echo "train-editor took $(( $(date +%s) - start )) s" >&2
"$PY" - "$OUT/train.json" <<'PY' || failed=1
import json, sys
r = json.load(open(sys.argv[1]))
print("train:", {k: v for k, v in r.items() if not isinstance(v, (list, dict))})
PY

step "apply ($DEVICE, bfloat16)"
kvtool edit apply --editor "$OUT/editor.safetensors" --device "$DEVICE" --dtype bfloat16 \
  --out "$OUT/edited-model" --overwrite --json --quiet > "$OUT/apply.json" || failed=1
"$PY" - "$OUT/apply.json" "$OUT/edited-model" <<'PY' || failed=1
import json, sys
from transformers import AutoModelForCausalLM
r = json.load(open(sys.argv[1]))
print("apply:", {k: v for k, v in r.items() if not isinstance(v, (list, dict))})
for e in r["edits"]:
    print(f"  held={e['held']}  p_pre={e['p_pre']:.3f}  p_post={e['p_post']:.3f}")
model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
print("edited model reloads:", type(model).__name__, next(model.parameters()).dtype)
PY

evaluate() {  # label editor device dtype
  kvtool edit evaluate --editor "$2" --device "$3" --dtype "$4" --json --quiet > "$OUT/eval_$1.json" || {
    failed=1
    return
  }
  "$PY" - "$OUT/eval_$1.json" "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for task, v in [*r["tasks"].items(), ("overall", r["overall"])]:
    cells = "  ".join(f"{k[:4]}={v[k]:.3f}" if v[k] is not None else f"{k[:4]}=-"
                      for k in ("reliability", "generalization", "locality", "portability"))
    print(f"{sys.argv[2]:22s} {task:12s} {cells}  n={v['n_records']}")
PY
}
step "evaluate"
evaluate "trained-${DEVICE}-bf16_on_${DEVICE}-bf16" "$OUT/editor.safetensors" "$DEVICE" bfloat16
evaluate "trained-${DEVICE}-bf16_on_${DEVICE}-f32" "$OUT/editor.safetensors" "$DEVICE" float32
evaluate "trained-${DEVICE}-bf16_on_cpu-f32" "$OUT/editor.safetensors" cpu float32
if [[ -n "${REF_EDITOR:-}" ]]; then
  evaluate "trained-cpu-f32_on_${DEVICE}-bf16" "$REF_EDITOR" "$DEVICE" bfloat16
  evaluate "trained-cpu-f32_on_cpu-f32" "$REF_EDITOR" cpu float32
fi
exit $failed
