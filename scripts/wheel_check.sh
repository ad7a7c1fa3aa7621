#!/usr/bin/env bash
# Build the wheel, install it with both halves in a fresh virtual environment outside the
# clone, and run each half's main commands on the embedded defaults (built on first use
# into a cache folder, since a wheel does not ship them). CI runs this after the tests.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$ROOT"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
WHEEL="$(ls "$WORK"/dist/kvtool-*.whl)"
"$WORK/venv/bin/pip" install -q -c "$ROOT/constraints.txt" "${WHEEL}[vfl,edit]"
cd "$WORK"
export KVTOOL_CACHE="$WORK/cache" KVTOOL_RUNS="$WORK/runs"
K="$WORK/venv/bin/kvtool"
"$K" --version
"$K" vfl pretrain-mpd --epochs 1 --quiet --json > /dev/null
"$K" vfl train-split --epochs 1 --init "$KVTOOL_RUNS/vfl/mpd.safetensors" --quiet --json > /dev/null
"$K" vfl distill --epochs 1 --quiet --json > /dev/null
"$K" vfl score --quiet --json | grep -q '"auc"'
"$K" edit train-editor --steps 20 --json > /dev/null   # says where it builds the embedded world
"$K" edit evaluate --quiet --json | grep -q '"reliability"'
echo "wheel check: kvtool installed from $(basename "$WHEEL") ran both halves on the embedded defaults"
