#!/usr/bin/env bash
# The zoo schedule for a small CPU machine (docs/results.md, "The zoo schedule on two CPU
# cores"): one named run per call, one torch thread, state in $FER_CACHE_DIR/runs/<run>, so it
# survives a fresh checkout and resumes where it stopped. Start two at a time, in the background:
#
#   nohup bash scripts/zoo_cpu.sh vgg19_kd > "$HOME/.cache/fer-service/runs/vgg19_kd.log" 2>&1 &
#
# A GPU user runs scripts/train_zoo.sh instead (DEVICE=cuda EPOCHS=250). DRY_RUN=1 prints the
# command a run would execute.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${FER_CACHE_DIR:-$HOME/.cache/fer-service}/runs
DATA=${DATA:-../shared/data/fer2013}
# every KD row in docs/results.md was distilled from the ensemble shipped from 2026-11-25 to
# 2026-12-03, kept (not served) under results/weights/
TEACHER=${TEACHER:-results/weights/ensemble_2026-11-25}
THREADS=${THREADS:-1}
# EPOCHS overrides a run's length, for a machine that keeps no state between working days: a
# run must then finish inside one sitting (the "session-sized" rows in docs/results.md). Resume
# with the same EPOCHS, since the cosine schedule depends on it.
EPOCHS=${EPOCHS:-}
run=${1:?usage: zoo_cpu.sh RUN (one of the names below)}

common=(--data "$DATA" --batch-size 128 --half-checkpoint --no-progress --resume --threads "$THREADS"
        --output-dir "$RUNS/$run")
kd=(--teacher "$TEACHER" --distill-alpha 0.5 --distill-temp 4)

case "$run" in
  cnn3_kd)     args=(--model cnn3 --epochs 40 --lr 0.05 --warmup-epochs 1 "${kd[@]}") ;;
  cnn5_kd)     args=(--model cnn5 --epochs 40 --lr 0.05 --warmup-epochs 1 "${kd[@]}") ;;
  # cnn5_kd's PublicTest accuracy swung by 13 points between epochs; this run logs it with the
  # running BatchNorm statistics and with statistics recomputed in float32 (precise BN)
  cnn5_kd_pbn) args=(--model cnn5 --epochs 28 --lr 0.05 --warmup-epochs 1 --bn-recalibrate 20 "${kd[@]}") ;;
  cnn7_kd)     args=(--model cnn7 --epochs 40 --lr 0.05 --warmup-epochs 1 "${kd[@]}") ;;
  vgg19_kd)    args=(--model vgg19 --epochs 60 --lr 0.1 --warmup-epochs 2 --aligned-views 0.5 "${kd[@]}") ;;
  resnet18_kd) args=(--model resnet18 --epochs 40 --lr 0.1 --warmup-epochs 2 --aligned-views 0.5 "${kd[@]}") ;;
  # AdamW: at 6 epochs it beat SGD by 4 points on the compact net (opt_sgd6 / opt_adamw6 below)
  resnet34_kd) args=(--model resnet34 --epochs 25 --opt adamw --lr 0.002 --weight-decay 0.05
                     --warmup-epochs 1 --aligned-views 0.5 "${kd[@]}") ;;
  # the stronger-student screen: 40 epochs each from scratch, no teacher, same recipe
  screen_compact)    args=(--model compact_resnet --epochs 40 --lr 0.1 --warmup-epochs 2 --seed 11) ;;
  screen_compact_fr) args=(--model compact_resnet_fr --epochs 40 --lr 0.1 --warmup-epochs 2 --seed 11) ;;
  screen_compact_w2) args=(--model compact_resnet_w2 --epochs 40 --lr 0.1 --warmup-epochs 2 --seed 11) ;;
  # camera augmentation A/B (docs/results.md, "CK+ zero-shot"): the same 20-epoch fine-tune of the
  # shipped default, taught by the shipped ensemble, without and with camera degradations
  camera_off) args=(--model compact_resnet --init checkpoints/default --epochs 20 --lr 0.02 --warmup-epochs 1
                    --aligned-views 0.5 --seed 9 --teacher "$TEACHER" --distill-alpha 0.6 --distill-temp 4) ;;
  camera_on)  args=(--model compact_resnet --init checkpoints/default --epochs 20 --lr 0.02 --warmup-epochs 1
                    --aligned-views 0.5 --seed 9 --teacher "$TEACHER" --distill-alpha 0.6 --distill-temp 4
                    --camera-aug 0.3) ;;
  # stored teacher views against live distillation: camera_off's fine-tune with the ensemble's
  # logits computed once on 8 fixed views of each face (--teacher-views 8)
  camera_off_views) args=(--model compact_resnet --init checkpoints/default --epochs 20 --lr 0.02
                          --warmup-epochs 1 --aligned-views 0.5 --seed 9 --teacher "$TEACHER"
                          --distill-alpha 0.6 --distill-temp 4 --teacher-views 8) ;;
  # diverse-ensemble members: the screen's from-scratch compact nets (their own lineage, not the
  # default's) fine-tuned the way the default was: aligned views, taught by the shipped ensemble.
  # They start from the screen's run folders, so those must still be there.
  member_compact_kd) args=(--model compact_resnet --init "$RUNS/screen_compact/best" --epochs 30 --lr 0.02
                           --warmup-epochs 1 --aligned-views 0.5 --seed 13 --teacher "$TEACHER"
                           --distill-alpha 0.6 --distill-temp 4) ;;
  member_fr_kd) args=(--model compact_resnet_fr --init "$RUNS/screen_compact_fr/best" --epochs 30 --lr 0.02
                      --warmup-epochs 1 --aligned-views 0.5 --seed 13 --teacher "$TEACHER"
                      --distill-alpha 0.6 --distill-temp 4) ;;
  # the new default: the shipped default fine-tuned 20 epochs with camera augmentation (kept by the
  # camera A/B), taught by the diverse ensemble through 8 stored views of each face, lr halved
  # since lr 0.02 knocked the converged default off its optimum. DIVERSE names that ensemble
  # (built by `fer-train ensemble ... --weights average`; docs/results.md says which members).
  default_diverse) args=(--model compact_resnet --init checkpoints/default --epochs 20 --lr 0.01
                         --warmup-epochs 1 --aligned-views 0.5 --seed 17 --camera-aug 0.3
                         --teacher "${DIVERSE:-$RUNS/diverse/ensemble}" --distill-alpha 0.6
                         --distill-temp 4 --teacher-views 8) ;;
  # a second cosine cycle of default_diverse from its best (same teacher, seed and stored views),
  # an ingredient for `fer-train soup` with the shipped default and default_diverse
  default_diverse2) args=(--model compact_resnet --init "$RUNS/default_diverse/best" --epochs 20 --lr 0.01
                          --warmup-epochs 1 --aligned-views 0.5 --seed 17 --camera-aug 0.3
                          --teacher "${DIVERSE:-$RUNS/diverse/ensemble}" --distill-alpha 0.6
                          --distill-temp 4 --teacher-views 8) ;;
  # the optimiser A/B for session-sized runs: from scratch, SGD sat at the majority class for
  # the first 2-3 epochs of every zoo run; 6 epochs of the compact net each way, no teacher
  opt_sgd6)   args=(--model compact_resnet --epochs 6 --lr 0.1 --warmup-epochs 1 --seed 5) ;;
  opt_adamw6) args=(--model compact_resnet --epochs 6 --opt adamw --lr 0.002 --weight-decay 0.05
                    --warmup-epochs 1 --seed 5) ;;
  *) echo "unknown run '$run'; see the case list in $0" >&2; exit 2 ;;
esac

[ -n "$EPOCHS" ] && args+=(--epochs "$EPOCHS")
if [ -n "${DRY_RUN:-}" ]; then  # print the command instead of running it
  printf '%q ' fer-train classify "${args[@]}" "${common[@]}"; echo; exit 0
fi
exec fer-train classify "${args[@]}" "${common[@]}"
