# Shared helpers of the launch scripts (sourced, not run). gpu_slurm.sh keeps its own copy: sbatch runs a
# spooled copy of the script, where this file's relative path does not exist.

# Shell-quotes one word only when it needs it, so printed commands stay readable and copy-pasteable.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf '%s' "${1@Q}"; fi
}
join_quoted() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}
DRY_RUN=0
# Prints a command, then runs it unless --dry-run (DRY_RUN=1).
run() {
  echo "+ $(join_quoted "$@")"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
