#!/usr/bin/env bash
# Trains ovseg_jax on a Cloud TPU VM pod slice: create or reuse the slice, ship the code to every worker,
# install jax[tpu]==0.10.2 + requirements + gcsfs there, then run the trainer on all workers at once (README.md (section "Launching")).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] [-- extra train flags]

Creates (or reuses) a TPU VM slice, copies this checkout to every worker, installs the pinned stack with
jax[tpu]==0.10.2 and gcsfs (gs:// workdir), and runs `python -m ovseg_jax.train` on all workers (--worker=all).

Options (environment variable in brackets):
  --project P        GCP project [TPU_PROJECT]; default: gcloud's configured project
  --zone Z           zone [TPU_ZONE] (default us-central2-b)
  --name N           TPU VM name [TPU_NAME] (default ovseg-pod)
  --accelerator A    accelerator type [TPU_ACCELERATOR] (default v4-32: 16 chips, 4 workers)
  --version V        TPU VM software version [TPU_VERSION] (default tpu-ubuntu2204-base)
  --spot             create the slice as a Spot VM (preemptible; the trainer resumes from its workdir)
  --config C         trainer config [TRAIN_CONFIG] (default configs/vitb.py), e.g. configs/vitb.py:stage=2
  --workdir gs://..  trainer workdir [TRAIN_WORKDIR], required: a GCS path every worker can write
  --code archive|clone   how the code gets there [TPU_CODE] (default archive: `git archive` of --ref, scp'd;
                     uncommitted changes are not shipped)
  --ref R            git ref to ship or check out [TPU_REF] (default HEAD)
  --repo URL         repository to clone with --code clone [TPU_REPO]
  --remote-dir D     code directory on the workers [TPU_REMOTE_DIR] (default ovseg_jax)
  --skip-setup       do not (re)install the environment (it is skipped cheaply anyway when unchanged)
  --detach           start training with nohup and return; each worker logs to <remote-dir>/train.log
  --dry-run          print every command, run none
  -h, --help         this text
Everything after `--` is passed to the trainer, e.g. `-- --config.train.total_epochs=1`.

Example:
  launch/tpu_pod.sh --project my-proj --zone us-central2-b --accelerator v4-32 \
      --config configs/vitb.py --workdir gs://my-bucket/ovseg/vitb_stage1
EOF
}

die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROJECT="${TPU_PROJECT:-}"
ZONE="${TPU_ZONE:-us-central2-b}"
NAME="${TPU_NAME:-ovseg-pod}"
ACCELERATOR="${TPU_ACCELERATOR:-v4-32}"
VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${TRAIN_CONFIG:-configs/vitb.py}"
WORKDIR="${TRAIN_WORKDIR:-}"
CODE="${TPU_CODE:-archive}"
REF="${TPU_REF:-HEAD}"
REPO="${TPU_REPO:-}"
REMOTE_DIR="${TPU_REMOTE_DIR:-ovseg_jax}"
SPOT=0
SKIP_SETUP=0
DETACH=0
EXTRA=()

need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --name) need_value "$@"; NAME="$2"; shift 2 ;;
    --accelerator) need_value "$@"; ACCELERATOR="$2"; shift 2 ;;
    --version) need_value "$@"; VERSION="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --code) need_value "$@"; CODE="$2"; shift 2 ;;
    --ref) need_value "$@"; REF="$2"; shift 2 ;;
    --repo) need_value "$@"; REPO="$2"; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR="$2"; shift 2 ;;
    --project=*|--zone=*|--name=*|--accelerator=*|--version=*|--config=*|--workdir=*|--code=*|--ref=*|--repo=*|--remote-dir=*)
      opt="${1%%=*}"; set -- "$opt" "${1#*=}" "${@:2}"; continue ;;
    --spot) SPOT=1; shift ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (trainer flags go after --)" ;;
  esac
done

[ -n "$WORKDIR" ] || die "--workdir is required: a gs:// path that every worker can write, e.g. gs://bucket/ovseg/run1"
[[ "$WORKDIR" == gs://* ]] || die "--workdir=$WORKDIR is not on GCS; every worker of a pod must reach it (gs://bucket/...)"
case "$CODE" in
  archive) ;;
  clone) [ -n "$REPO" ] || die "--code clone needs --repo URL (the repository the workers clone)" ;;
  *) die "--code=$CODE: expected archive or clone" ;;
esac
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--remote-dir=$REMOTE_DIR: use a plain directory name (letters, digits, . _ -)"
cd "$(dirname "$0")/.."

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE")
[ -z "$PROJECT" ] || WHERE+=(--project="$PROJECT")
# Runs one shell command on every worker of the slice at the same time.
on_all_workers() { run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"; }

echo "# 1. TPU VM slice $NAME ($ACCELERATOR, $VERSION) in $ZONE: reuse it if it exists, else create it"
create=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCELERATOR" --version="$VERSION")
[ "$SPOT" = 0 ] || create+=(--spot)
describe=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" '--format=value(state,acceleratorType)')
if [ "$DRY_RUN" = 1 ]; then
  echo "+ $(join_quoted "${describe[@]}")"
  echo "# only if the describe above finds no TPU VM named $NAME:"
  echo "+ $(join_quoted "${create[@]}")"
else
  echo "+ $(join_quoted "${describe[@]}")"
  if info="$("${describe[@]}" 2>/dev/null)"; then
    read -r state accel <<<"$info"
    [ "${accel##*/}" = "$ACCELERATOR" ] \
      || die "TPU VM $NAME exists with accelerator ${accel##*/}, not $ACCELERATOR; pick another --name or --accelerator"
    [ "$state" = READY ] \
      || die "TPU VM $NAME is $state, not READY; start it (gcloud compute tpus tpu-vm start $NAME ...) or delete it"
    echo "# reusing $NAME ($state)"
  else
    run "${create[@]}"
  fi
fi

echo "# 2. code -> ~/$REMOTE_DIR on every worker"
if [ "$CODE" = archive ]; then
  tarball="${TMPDIR:-/tmp}/ovseg_jax-${REF//[^A-Za-z0-9_.-]/_}.tar.gz"
  if [ "$DRY_RUN" = 0 ] && [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "# warning: uncommitted changes are not shipped: git archive packs $REF as committed" >&2
  fi
  run git archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$tarball" "$REF"
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:$REMOTE_DIR.tar.gz" "${WHERE[@]}" --worker=all
  on_all_workers "rm -rf $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz && rm $REMOTE_DIR.tar.gz"
else
  on_all_workers "rm -rf $REMOTE_DIR && git clone $(quote "$REPO") $REMOTE_DIR && git -C $REMOTE_DIR checkout $(quote "$REF")"
fi

if [ "$SKIP_SETUP" = 0 ]; then
  echo "# 3. environment on every worker: Python 3.11 (jax 0.10 needs >= 3.11), requirements, jax[tpu]==0.10.2, gcsfs (gs:// workdir)"
  on_all_workers "cd $REMOTE_DIR && (command -v python3.11 >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv)) && bash launch/setup_venv.sh run && .venv/bin/pip install -q 'jax[tpu]==0.10.2' gcsfs==2026.10.1"
  echo "# 4. check: every worker sees the whole slice"
  on_all_workers "cd $REMOTE_DIR && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"
fi

echo "# 5. train on all workers (jax.distributed.initialize() finds the TPU workers by itself)"
train=(.venv/bin/python -m ovseg_jax.train --config="$CONFIG" --workdir="$WORKDIR" --config.distributed=True "${EXTRA[@]}")
if [ "$DETACH" = 1 ]; then
  on_all_workers "cd $REMOTE_DIR && nohup $(join_quoted "${train[@]}") > train.log 2>&1 < /dev/null &"
  echo "# started; follow a worker with: $(join_quoted "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=0 --command="tail -f $REMOTE_DIR/train.log")"
else
  on_all_workers "cd $REMOTE_DIR && $(join_quoted "${train[@]}")"
fi
