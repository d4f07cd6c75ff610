#!/usr/bin/env bash
# The embedded default, end to end, on a laptop CPU (README's first command):
#   venv + install -> synthetic caption dataset (through the CC4M builder) -> train configs/tiny.py with all three
#   losses -> export -> zero-shot evaluation on a held-out synthetic split -> pictures.
#
#   bash launch/local.sh [--run DIR] [--seed S] [--steps N] [--ablation all|contrast|entity|mask] [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=runs/local SEED=0 STEPS="" ABLATION=all DRY=0 TRAIN_IMAGES=20000 VAL_IMAGES=200 VAL_SEED=1
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --run) RUN="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --ablation) ABLATION="$2"; shift 2 ;;
    --val_images) VAL_IMAGES="$2"; shift 2 ;;
    --val_seed) VAL_SEED="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY=.venv/bin/python
VARIANT="ablation=$ABLATION"; [ -n "$STEPS" ] && VARIANT="$VARIANT,steps=$STEPS"
run() { echo "+ $*"; [ "$DRY" = 1 ] || "$@"; }
stage() { echo; echo "== [$(date +%H:%M:%S)] $* =="; }
t0=$(date +%s)

stage "1/6 venv and install (cached after the first run)"
run bash launch/setup_venv.sh run
stage "2/6 synthetic caption dataset -> tfds array_record (train) and a held-out VOC-layout split"
run "$PY" -m ovseg_jax.data.synthetic --output "$RUN/data" --split train --num_images "$TRAIN_IMAGES" --seed 0 --format tfds --num_workers 2
run "$PY" -m ovseg_jax.data.synthetic --output "$RUN/val" --split val --num_images "$VAL_IMAGES" --seed "$VAL_SEED" --format voc
stage "3/6 train configs/tiny.py:$VARIANT (contrast + entity + mask with EMA teacher, + patch-level grounding)"
run "$PY" -m ovseg_jax.train --config="configs/tiny.py:$VARIANT" --workdir="$RUN/train" \
  --config.data.data_dir="$RUN/data" --config.eval_during_training.data_dir="$RUN/val" --config.seed="$SEED"
stage "4/6 export the inference checkpoint"
run "$PY" -m ovseg_jax.export --workdir "$RUN/train" --dst "$RUN/export"
stage "5/6 zero-shot evaluation on the held-out split"
run "$PY" -m ovseg_jax.evaluate --checkpoint "$RUN/export" --dataset folder --data_dir "$RUN/val" \
  --output "$RUN/metrics.json"
stage "6/6 pictures: input | group map | prediction | ground truth"
run "$PY" -m ovseg_jax.visualize --checkpoint "$RUN/export" --data_dir "$RUN/val" --num_images 6 \
  --output "$RUN/pictures"
echo; echo "done in $(( $(date +%s) - t0 )) s: metrics $RUN/metrics.json, pictures $RUN/pictures/"
