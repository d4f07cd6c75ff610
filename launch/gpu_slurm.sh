#!/usr/bin/env bash
#SBATCH --job-name=ovseg_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
# One JAX process per GPU on SLURM (README.md (section "Launching")). Submit it with sbatch, or run it with bash and it submits
# itself. Inside the job, `srun` starts SLURM_NTASKS processes; jax.distributed.initialize() (called by the
# trainer for --config.distributed=True) reads SLURM_PROCID / SLURM_NTASKS / SLURM_STEP_NODELIST / SLURM_LOCALID,
# puts the coordinator on the first node, and lets local task i drive GPU i of its node.
#
# Why --gpus-per-node and not --gpus-per-task=1: jax's SLURM detection selects GPU number SLURM_LOCALID among
# the GPUs a task can see, so every task of a node must see all of them; with --gpus-per-task=1 each task sees
# only its own GPU as device 0 and tasks 1..7 find no device (jax-ml/jax#28194).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: sbatch [sbatch options] launch/gpu_slurm.sh --config C --workdir W [-- extra train flags]
       bash launch/gpu_slurm.sh [--nodes N] [--gpus-per-node G] [--dry-run] --config C --workdir W [-- ...]

With bash (outside a job) it submits itself: sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G ...
Inside the job it runs: srun python -m ovseg_jax.train --config=C --workdir=W --config.distributed=True ...

Options (environment variable in brackets):
  --config C          trainer config [TRAIN_CONFIG] (default configs/vitb.py)
  --workdir W         trainer workdir [TRAIN_WORKDIR], required: a shared filesystem path or gs://...
  --nodes N           nodes to ask for when submitting [SLURM_NODES] (default: the #SBATCH line, 1)
  --gpus-per-node G   GPUs (= processes) per node when submitting [GPUS_PER_NODE] (default 8)
  --python P          interpreter on the nodes [PYTHON] (default .venv/bin/python of the submit directory)
  --dry-run           print the sbatch (outside a job) or srun (inside one) command, run nothing
  -h, --help          this text
Other sbatch settings (partition, account, time) come from sbatch's own options or SBATCH_* variables.
Everything after `--` is passed to the trainer.

Example:
  bash launch/gpu_slurm.sh --nodes 2 --config configs/vitb.py --workdir /shared/ovseg/vitb_stage1
EOF
}

die() { echo "gpu_slurm.sh: error: $*" >&2; exit 2; }
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}
join_quoted() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}
DRY_RUN=0
run() {
  echo "+ $(join_quoted "$@")"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

CONFIG="${TRAIN_CONFIG:-configs/vitb.py}"
WORKDIR="${TRAIN_WORKDIR:-}"
NODES="${SLURM_NODES:-}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PYTHON_BIN="${PYTHON:-.venv/bin/python}"
EXTRA=()
need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS_PER_NODE="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON_BIN="$2"; shift 2 ;;
    --config=*|--workdir=*|--nodes=*|--gpus-per-node=*|--python=*)
      opt="${1%%=*}"; set -- "$opt" "${1#*=}" "${@:2}"; continue ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (trainer flags go after --)" ;;
  esac
done
[ -n "$WORKDIR" ] || die "--workdir is required: a path every node can write (shared filesystem or gs://...)"
[[ -z "$NODES" || "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes=$NODES: expected a positive integer"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node=$GPUS_PER_NODE: expected a positive integer"

if [ -z "${SLURM_JOB_ID:-}" ]; then
  # Outside a job: submit this script, from the repository root, with the same arguments.
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  submit=(sbatch --chdir="$repo")
  [ -z "$NODES" ] || submit+=(--nodes="$NODES")
  submit+=(--ntasks-per-node="$GPUS_PER_NODE" --gpus-per-node="$GPUS_PER_NODE")
  # The job gets the trainer's arguments only; --dry-run and the submit-time options stay here.
  run "${submit[@]}" "$repo/launch/gpu_slurm.sh" --config="$CONFIG" --workdir="$WORKDIR" --python="$PYTHON_BIN" \
    -- "${EXTRA[@]}"
  exit 0
fi

# Inside the job (the batch step runs on the first node; srun fans out to every task).
[ -f ovseg_jax/train.py ] || [ "$DRY_RUN" = 1 ] || die "no ovseg_jax/train.py in $PWD; submit from the repository root (bash launch/gpu_slurm.sh does)"
[ -x "$PYTHON_BIN" ] || [ "$DRY_RUN" = 1 ] || die "no interpreter at $PYTHON_BIN; create it with: bash launch/setup_venv.sh run (then pip install 'jax[cuda12]==0.10.2')"
echo "# job ${SLURM_JOB_ID}: ${SLURM_NTASKS:-?} processes on ${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST:-}"
run srun --kill-on-bad-exit=1 "$PYTHON_BIN" -m ovseg_jax.train --config="$CONFIG" --workdir="$WORKDIR" \
  --config.distributed=True "${EXTRA[@]}"
