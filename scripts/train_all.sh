#!/usr/bin/env bash
# The full training stack on SynthMUSIC, in order: data, detector, visual encoders + feature
# cache, the three separators on the same time budget, evaluation, and the shipped checkpoint.
# Usage: scripts/train_all.sh [DATA=data/synth] [MINUTES=55]   (run it under nohup; ~1.5 h on
# a 2-core CPU: the settings of docs/RESULTS.md). Each step is skipped when its output already
# exists, so a rerun resumes.
set -euo pipefail
DATA=${1:-data/synth}
MINUTES=${2:-55}
PY=${PY:-.venv/bin/python}
mkdir -p runs

[ -f "$DATA/dataset.json" ] || $PY -m training.synth --out "$DATA" --size default --seed 0
[ -f runs/detector/detector.onnx ] || $PY -m training.train_detector --data "$DATA" \
    --out runs/detector --steps 600 --batch 16 --frames-per-clip 4 --threads 2
[ -f "$DATA/features/summary.json" ] || $PY -m training.encoders --data "$DATA" \
    --encoders-out runs/encoders --detector runs/detector/detector.onnx \
    --obj-steps 80 --motion-steps 500
# One thread each, run side by side: the same time budget for every row of the table.
for m in sop iquery_nomotion iquery; do
    $PY -m training.train --data "$DATA" --preset cpu --model "$m" --minutes "$MINUTES" \
        --steps 30000 --threads 1 --val-every 1000 --out "runs/$m" --no-progress \
        > "runs/$m.log" 2>&1 &
done
wait
$PY -m training.evaluate --data "$DATA" --out runs/results --max-ensembles 20 \
    --ckpt "Sound-of-Pixels=runs/sop/best" --ckpt "iQuery without motion=runs/iquery_nomotion/best" \
    --ckpt "iQuery=runs/iquery/best"
$PY -m training.package --out models/checkpoints/cpu --separator runs/iquery/best \
    --detector runs/detector --encoders runs/encoders --results runs/results/results.json
