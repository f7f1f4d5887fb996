#!/usr/bin/env bash
# Train the whole model zoo with the long recipe, fit the ensemble and distil it into the
# compact default. Every step resumes: rerun the script after an interruption (or after a
# time-limited call such as the GPU device tool's 10 minutes) and it continues where it stopped.
#
#   DEVICE=cuda EPOCHS=250 bash scripts/train_zoo.sh            # a GPU box
#   DEVICE=cpu EPOCHS=30 THREADS=1 MODELS="cnn3" bash scripts/train_zoo.sh
#
# Environment: DATA (FER2013 folder), OUT (run folder, default runs/zoo), DEVICE (auto),
# EPOCHS (250), THREADS (0 = torch default), MODELS (the members to train), BUDGET (epochs per
# model in this invocation, 0 = all; lets a time-limited call stop cleanly between epochs),
# EXTRA (more `fer-train classify` options, e.g. "--train-limit 512" for a quick check).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-../shared/data/fer2013}
OUT=${OUT:-runs/zoo}
DEVICE=${DEVICE:-auto}
EPOCHS=${EPOCHS:-250}
THREADS=${THREADS:-0}
BUDGET=${BUDGET:-0}
MODELS=${MODELS:-"cnn3 cnn5 cnn7 vgg19 resnet18 resnet34 compact_resnet"}

# The recipe of docs/results.md: SGD + Nesterov, warm-up then cosine, label smoothing 0.1,
# crop / flip / rotation / zoom / random erasing on the batch, bf16 or fp16 autocast.
common=(--data "$DATA" --epochs "$EPOCHS" --batch-size 128 --warmup-epochs 2 --device "$DEVICE"
        --threads "$THREADS" --epoch-budget "$BUDGET" --half-checkpoint --no-progress --resume)
read -r -a extra <<< "${EXTRA:-}"
common+=("${extra[@]}")

lr_for() {  # the paper CNNs have large fully connected layers and want a smaller step
  case "$1" in cnn3|cnn5|cnn7) echo 0.05 ;; *) echo 0.1 ;; esac
}

finished() {  # true when the run's last checkpoint is its final epoch
  local card="$OUT/$1/last.json"
  [[ -f "$card" ]] && python -c "import json,sys; c=json.load(open(sys.argv[1]));
sys.exit(0 if c.get('epochs_trained', 0) >= int(sys.argv[2]) else 1)" "$card" "$EPOCHS"
}

members=()
for model in $MODELS; do
  fer-train classify --model "$model" --lr "$(lr_for "$model")" --output-dir "$OUT/$model" "${common[@]}"
  finished "$model" || { echo "$model is not finished yet; rerun to continue" >&2; exit 3; }
  members+=("$OUT/$model/best")
done

fer-train ensemble "${members[@]}" --output "$OUT/ensemble/best" --tta --data "$DATA" \
  --device "$DEVICE" --half

# The default serves detect -> align crops: half its training faces are those crops.
fer-train classify --model compact_resnet --lr 0.1 --teacher "$OUT/ensemble/best" --aligned-views 0.5 \
  --distill-alpha 0.5 --distill-temp 4 --seed 1 --output-dir "$OUT/compact_resnet_distilled" "${common[@]}"
finished compact_resnet_distilled || { echo "distillation not finished yet; rerun" >&2; exit 3; }

fer-train eval "$OUT/compact_resnet_distilled/best" --data "$DATA" --device "$DEVICE"
echo "done: ensemble in $OUT/ensemble, distilled default in $OUT/compact_resnet_distilled"
