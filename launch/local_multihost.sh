#!/usr/bin/env bash
# Multi-host training on one machine: NPROC local JAX processes with DEVICES_PER_PROC fake CPU devices each,
# joined through a coordinator on 127.0.0.1 (README.md (section "Launching")). This is how multi-host code is tested here.
#
# Each process runs launch/train_and_report.py: the trainer (same flags, same train.train) plus a final
# `final: {...}` line on every process, since the trainer itself prints progress on process 0 only.
#
# How the processes find each other: the trainer calls jax.distributed.initialize() with no arguments for
# --config.distributed=True. jax reads the coordinator from JAX_COORDINATOR_ADDRESS, and the process id and count
# from its SLURM cluster detection (SLURM_PROCID, SLURM_NTASKS, with SLURM_JOB_ID / SLURM_STEP_NODELIST /
# SLURM_LOCALID present), so each process gets exactly the variables one task of a one-node SLURM step has:
# the same code path launch/gpu_slurm.sh uses on a cluster.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local_multihost.sh [options] NPROC DEVICES_PER_PROC [extra train flags]

Starts NPROC trainer processes (launch/train_and_report.py = python -m ovseg_jax.train + a final report line,
--config.distributed=True), each with
XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROC, trains for a few steps, and prints the final
loss each process reports (they must agree: the loss is a global quantity).

Options:
  --config C     trainer config (default configs/tiny.py)
  --steps N      training steps (default 3); sets --config.train.total_steps=N and logs every step
  --workdir W    shared workdir (default runs/local_multihost/<NPROC>x<DEVICES_PER_PROC>); must not hold an
                 earlier run unless --resume (the trainer would resume from it)
  --resume       allow an existing workdir
  --port P       coordinator port on 127.0.0.1 (default: a free port)
  --python P     interpreter (default .venv/bin/python, else python3) [PYTHON]
  --timeout S    kill every process after S seconds (default 900)
  --dry-run      print the commands, run nothing
  -h, --help     this text
Extra arguments go to every process's trainer, e.g. --config.mesh="(('data',-1),('fsdp',2))".
Logs: <workdir>/logs/process_<i>.log.

Example:
  launch/local_multihost.sh 2 4
EOF
}

die() { echo "local_multihost.sh: error: $*" >&2; exit 2; }
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$(dirname "$0")/.."
CONFIG=configs/tiny.py
STEPS=3
WORKDIR=""
RESUME=0
PORT=""
PYTHON_BIN="${PYTHON:-}"
TIMEOUT=900
DRY_RUN=0
POSITIONAL=()
need_value() { [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --steps) need_value "$@"; STEPS="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --python) need_value "$@"; PYTHON_BIN="$2"; shift 2 ;;
    --timeout) need_value "$@"; TIMEOUT="$2"; shift 2 ;;
    --steps=*|--workdir=*|--port=*|--python=*|--timeout=*)
      opt="${1%%=*}"; set -- "$opt" "${1#*=}" "${@:2}"; continue ;;
    --config=*)  # --config=configs/x.py is ours; --config.key=value (with a dot) is a trainer flag
      CONFIG="${1#*=}"; shift ;;
    --resume) RESUME=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) if [ "${#POSITIONAL[@]}" -lt 2 ]; then POSITIONAL+=("$1"); shift; else break; fi ;;
  esac
done
EXTRA=("$@")
[ "${#POSITIONAL[@]}" = 2 ] || { usage >&2; die "expected NPROC and DEVICES_PER_PROC"; }
NPROC="${POSITIONAL[0]}"
DEVICES="${POSITIONAL[1]}"
for v in NPROC DEVICES STEPS TIMEOUT; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v=${!v}: expected a positive integer"
done
[ -n "$WORKDIR" ] || WORKDIR="runs/local_multihost/${NPROC}x${DEVICES}"
if [ -z "$PYTHON_BIN" ]; then
  if [ -x .venv/bin/python ]; then PYTHON_BIN=.venv/bin/python; else PYTHON_BIN=python3; fi
fi
if [ -z "$PORT" ]; then
  PORT="$("$PYTHON_BIN" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port=$PORT: expected a number"
if [ "$DRY_RUN" = 0 ] && [ "$RESUME" = 0 ] && [ -d "$WORKDIR" ] && [ -n "$(ls -A "$WORKDIR")" ]; then
  die "$WORKDIR holds an earlier run (the trainer would resume from it); remove it, pass --workdir, or --resume"
fi

# The fake-device flag is ours; any other XLA flags of the caller are kept.
xla_flags=""
for f in ${XLA_FLAGS:-}; do
  [[ "$f" == --xla_force_host_platform_device_count=* ]] || xla_flags+="$f "
done
xla_flags+="--xla_force_host_platform_device_count=$DEVICES"

LOGS="$WORKDIR/logs"
commands=()
for ((i = 0; i < NPROC; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags"
       "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT" "JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:$PORT"
       SLURM_JOB_ID=0 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_NODES=1
       "SLURM_NTASKS=$NPROC" "SLURM_PROCID=$i" "SLURM_LOCALID=$i"
       "$PYTHON_BIN" launch/train_and_report.py --config="$CONFIG" --workdir="$WORKDIR" --config.distributed=True
       --config.train.total_steps="$STEPS" --config.train.log_every_steps=1 "${EXTRA[@]}")
  commands+=("$(join_quoted "${cmd[@]}") > $(quote "$LOGS/process_$i.log") 2>&1")
done

echo "+ mkdir -p $(quote "$LOGS")"
for c in "${commands[@]}"; do echo "+ $c &"; done
[ "$DRY_RUN" = 0 ] || exit 0

mkdir -p "$LOGS"
pids=()
# Each process leads its own process group (job control on), so stopping it also stops its children (grain
# workers). SIGTERM first: the trainer treats it as a preemption; SIGKILL for one stuck at a collective.
alive() {
  local p
  for p in "${pids[@]}"; do kill -0 -- "-$p" 2>/dev/null && return 0; done
  return 1
}
cleanup() {
  local p t=0
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  while alive && [ "$t" -lt 10 ]; do sleep 0.5; t=$((t + 1)); done
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM
set -m
for c in "${commands[@]}"; do
  bash -c "exec $c" &
  pids+=("$!")
done
set +m

# Wait for all; stop every process when one fails (the others would wait for it at the next collective) or
# when the time is up.
deadline=$((SECONDS + TIMEOUT))
status=0
remaining=("${pids[@]}")
while [ "${#remaining[@]}" -gt 0 ]; do
  still=()
  for idx in "${!pids[@]}"; do
    p="${pids[$idx]}"
    [[ " ${remaining[*]} " == *" $p "* ]] || continue
    if kill -0 "$p" 2>/dev/null; then
      still+=("$p")
    else
      rc=0
      wait "$p" || rc=$?
      if [ "$rc" != 0 ]; then
        echo "process $idx failed with exit code $rc; last lines of $LOGS/process_$idx.log:" >&2
        tail -n 20 "$LOGS/process_$idx.log" >&2 || true
        status=1
      fi
    fi
  done
  remaining=("${still[@]}")
  if [ "${#remaining[@]}" -gt 0 ] && { [ "$status" != 0 ] || [ "$SECONDS" -ge "$deadline" ]; }; then
    [ "$status" != 0 ] || echo "timeout after ${TIMEOUT}s; stopping the processes" >&2
    cleanup
    status=1
    wait || true
    break
  fi
  [ "${#remaining[@]}" = 0 ] || sleep 0.5
done
trap - INT TERM
[ "$status" = 0 ] || exit "$status"

# The final loss each process reported (its `final: {...}` line).
for ((i = 0; i < NPROC; i++)); do
  line="$(grep '^final: ' "$LOGS/process_$i.log" | tail -n 1 || true)"
  [ -n "$line" ] || { echo "process $i printed no final line; see $LOGS/process_$i.log" >&2; exit 1; }
  loss="$("$PYTHON_BIN" -c 'import json, sys; r = json.loads(sys.argv[1][7:]); print(r["step"], r.get("loss"))' "$line")"
  echo "process $i: step ${loss% *} final loss ${loss#* }"
done
