#!/usr/bin/env bash
# The quick-start main job: the VFed-SSD pipeline and the InstructEdit pipeline on the
# embedded demo data, each command reading the previous one's default output in runs/.
set -euo pipefail
echo "== VFed-SSD on the embedded two-party demo data ==" >&2
kvtool vfl pretrain-mpd
# --init picks up the MPD towers (without it train-split starts from scratch: vanilla VFL).
kvtool vfl train-split --init "${KVTOOL_RUNS:-runs}/vfl/mpd.safetensors"
kvtool vfl distill
kvtool vfl score --mode local
kvtool vfl score --mode federated

echo "== InstructEdit on the embedded world (zsre held out) ==" >&2
# Demo preset: 800 meta-training steps, a fraction of the default 3000, so that the quick
# start stays short; expect lower scores than the README's tables (full defaults).
echo "(demo preset: train-editor --steps 800; the default is 3000 steps)" >&2
kvtool edit train-editor --steps 800
kvtool edit apply --overwrite
kvtool edit evaluate
