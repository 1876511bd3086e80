#!/usr/bin/env bash
#SBATCH --job-name=h-pylori
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm-%j.out
#
# Stage the HelicoDataSet to node-local disk, audit the split for patient leaks, train, evaluate.
#
#   mkdir -p runs                 # sbatch opens runs/slurm-<jobid>.out before this script starts
#   HELICO_DATA=/shared/HelicoDataSet sbatch run_h_pylori.sh --run-id 26 --epochs 15
#   sbatch --array=0-4 run_h_pylori.sh --run-id 27 --folds 5   # fold i per array task, in runs/27-f<i>; then, once
#                                 # every fold ended well, one job: runs/27-cv/ (evaluate.py --cv) and
#                                 # runs/27-ensemble/ (evaluate.py --holdout --ensemble)
#   bash run_h_pylori.sh --finish-cv --run-id 27 --folds 5   # that last step by hand (after rerunning a failed fold)
#   # no SLURM, no GPU, no internet, after `make demo` (which writes demo_data) (a few minutes on a laptop):
#   HELICO_DATA=demo_data bash run_h_pylori.sh --run-id try-cpu --device cpu --weights none --image-size 64 --epochs 1
#   bash run_h_pylori.sh --stage-only          # only stage (pre-warm a node); prints the staged path
#   bash run_h_pylori.sh --clean-stage         # remove this node's staged copy of HELICO_DATA (and its caches)
#
# Steps: audit, train.py, train_patient.py (the patient model of the run's best.pt: gated-attention MIL over each
# patient's features, runs/<id>/patient/; --no-patient-model skips it), evaluate.py (both side by side).
# An array of folds (--folds K, task i = fold i): its first task submits, once, a job that waits for the whole array
# (--dependency=afterok:<array job>) and runs --finish-cv: evaluate.py --cv and evaluate.py --holdout --ensemble over
# runs/27-f0..f<K-1>, reusing each fold's own evaluation; a failed fold cancels it, and that fold's log says so.
# Every argument goes to train.py (see `python train.py --help`), and the same list to audit_leakage.py, which accepts
# train.py's whole command line: the audit checks exactly the split that will be trained. Write flags in full: a
# mistyped or abbreviated flag (--val for --val-frac) is refused (exit 2) before anything is staged.
# Offline compute nodes: train.py's default --weights imagenet reads torchvision's cache, which is
# `python -c 'import torch; print(torch.hub.get_dir())'`/checkpoints; fill it once on a login node with
# `python -c 'import torchvision; torchvision.models.resnet18(weights="DEFAULT")'` (same $TORCH_HOME), or pass
# --weights none (random init) or --weights FILE.
# The run folder is RUNS_DIR/<run-id>, what a requeued job resumes from; --run-id defaults to $SLURM_JOB_ID
# (unchanged by a requeue) and is required outside SLURM.
#
# Environment:
#   HELICO_DATA        the dataset root on shared storage (required unless --data-root is given)
#   PYTHON             interpreter (default: .venv/bin/python next to this script if present, else python)
#   RUNS_DIR           where run folders go (default: runs, relative to the submit directory; --runs-dir wins)
#   STAGE_DIR          node-local staging base (default: $SLURM_TMPDIR, else $TMPDIR, else /tmp/$USER);
#                      STAGE_DIR=off trains straight from HELICO_DATA
#   STAGE_RESERVE_MB   free space to leave on the node disk after staging (default 1024)
#   STAGE_LOCK_TIMEOUT seconds to wait for another job's copy on this node before giving up (default 7200)
#   EVAL_ARGS          extra evaluate.py flags, split on spaces (e.g. "--holdout --bootstrap 2000"); --finish-cv
#                      passes them to --cv (without --holdout) and to --holdout --ensemble
#   CV_SBATCH_ARGS     extra sbatch flags for an array's --finish-cv job, split on spaces (e.g. "--time=2:00:00");
#                      it gets the array task's CPUs, memory, partition and (no) GPUs by default
#   CACHE              on (default) or off. on: pass --cache-base <staged copy>-cache to train.py and evaluate.py, which
#                      build or reuse the packed patch cache there (~0.2 MB per 256px patch, ~43 GB for the full
#                      dataset), in the folder train.py names for its image size, cache kind and stain reference
#                      (Macenko applied once, in the cache, by default), so no epoch decodes a PNG. Only for a
#                      staged copy: a cache belongs on node-local disk, never beside HELICO_DATA. Without a staged
#                      copy, or when the build fails for want of room, training decodes PNGs, with a warning. An
#                      explicit --cache DIR wins (and a failure there stops the job).
#
# Staged copies stay on the node for the next job (the end of every job logs where, and how big). Remove them
# with --clean-stage on that node (under SLURM: srun -w NODE bash run_h_pylori.sh --clean-stage): it removes the
# copy of HELICO_DATA (or --data-root), its marker and its caches, unless a job on the node is using it.
#
# Exit codes, the same meaning for every step, read from the step's exit code alone (the log names the step and says
# what to do): 0 done | 1 the audit found a patient leak, nothing trained (from train.py/evaluate.py: the HoldOut is
# not independent of CrossValidation) | 2 bad input (a flag, file, folder or missing Python module named in the
# message); fix it, nothing to resume | 3 non-finite loss (last good checkpoint kept) | 4 stopped by a signal after
# writing last.pt: under SLURM the job was requeued and resumes by itself, else run the same command to resume |
# 5 environment fault (no space, I/O error, or --clean-stage on a copy in use): free space then run the same command |
# 128+N killed by signal N | any other code: the step crashed, a bug (its traceback is above).
set -euo pipefail

log() { printf '[run_h_pylori %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }  # stdout is left to the steps
warn() { printf '[run_h_pylori %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { local code=$1; shift; printf 'error: %s\n' "$*" >&2; exit "$code"; }

# The usage text is the comment block under the #SBATCH lines, so it cannot drift from the documentation.
usage() { awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }

# ------------------------------------------------------------------------------------------- arguments
# TRAIN_ARGS go to train.py and, the same list, to the audit. --data-root, --runs-dir and --run-id are taken out here
# because this script decides them (the staged copy; RUNS_DIR; SLURM's job ID) and gives them back resolved; the
# rest passes through untouched, in order: train.py's parser, not this script, knows what each flag takes.
TRAIN_ARGS=() RUN_ID="" ARG_DATA_ROOT="" ARG_RUNS_DIR="" ARG_CACHE="" MODE=run PATIENT_MODEL=on CV_ID="" FOLD_NOTE=""

parse_args() {
  local arg name value
  while (( $# )); do
    arg=$1 name=${1%%=*}
    case $arg in
      -h|--help|--stage-only|--clean-stage|--finish-cv) shift; continue ;;  # modes, read by main
      --no-patient-model) PATIENT_MODEL=off; shift; continue ;;  # this script's own: no train_patient.py step
    esac
    case $name in
      --data-root|--runs-dir|--run-id|--cache) ;;
      *) TRAIN_ARGS+=("$arg"); shift; continue ;;
    esac
    if [[ $arg == *=* ]]; then value=${arg#*=}; shift
    else
      (( $# >= 2 )) || die 2 "flag $name needs a value"
      value=$2; shift 2
    fi
    case $name in
      --data-root) ARG_DATA_ROOT=$value ;;
      --runs-dir) ARG_RUNS_DIR=$value ;;
      --run-id) RUN_ID=$value ;;
      --cache) ARG_CACHE=$value; TRAIN_ARGS+=(--cache "$value") ;;  # train.py's; evaluate.py reads it too
    esac
  done
}

# A mistyped or abbreviated flag, or a run folder holding an earlier model that train.py would refuse, is refused
# before the copy, by the parser and run-folder check train.py uses: the audit's (it accepts train.py's whole command
# line and loads no torch, so this costs a fraction of a second). It also proves PYTHON.
check_flags() {
  local errs rc=0
  errs=$("$PY" "$CODE_DIR/audit_leakage.py" --check-flags ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} 2>&1 >/dev/null) || rc=$?
  (( rc != 0 )) || return 0
  if (( rc == 2 )) && [[ $errs == *"error: "* ]]; then
    [[ $errs == *"error: argument "* || $errs == *"error: unrecognized arguments"* ]] || die 2 "${errs##*error: }"
    die 2 "${errs##*error: } (every argument goes to train.py: see python train.py --help; write flags in full)"
  fi
  printf '%s\n' "$errs" >&2
  die 2 "PYTHON=$PY cannot run $CODE_DIR/audit_leakage.py (exit $rc, output above); set PYTHON to the project's venv"
}

# `sbatch --array=0-4 run_h_pylori.sh --run-id 27 --folds 5`: array task i trains and audits fold i (its test part)
# into runs/27-f<i>, the run folders `evaluate.py --cv runs/27-f*` pools. An explicit --fold wins.
array_fold() {
  [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] && has_flag --folds && ! has_flag --fold || return 0
  TRAIN_ARGS+=(--fold "$SLURM_ARRAY_TASK_ID")
  CV_ID=$RUN_ID RUN_ID=$RUN_ID-f$SLURM_ARRAY_TASK_ID
  log "array task $SLURM_ARRAY_TASK_ID: fold $SLURM_ARRAY_TASK_ID, run folder $RUN_ID"
}

flag_value() {  # the value of --flag V or --flag=V among the arguments given (the last one); fails without one
  local a want=0 value=""
  for a in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do
    if (( want )); then value=$a want=0; elif [[ $a == "$1" ]]; then want=1
    elif [[ $a == "$1="* ]]; then value=${a#*=}; fi
  done
  [[ -n $value ]] && printf '%s\n' "$value"
}

has_flag() {  # --flag or --flag=value among the arguments given (--fold is not --folds)
  local a
  for a in ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do [[ $a == "$1" || $a == "$1="* ]] && return 0; done
  return 1
}

# Under sbatch this file runs from a spool copy, so its own directory does not hold train.py.
find_code_dir() {
  local here
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  if [[ -f $here/train.py || -z ${SLURM_SUBMIT_DIR:-} ]]; then CODE_DIR=$here; else CODE_DIR=$SLURM_SUBMIT_DIR; fi
}

pick_python() {
  local default=python
  [[ -x $CODE_DIR/.venv/bin/python ]] && default=$CODE_DIR/.venv/bin/python
  PY=${PYTHON:-$default}
  command -v "$PY" >/dev/null || die 2 "PYTHON=$PY is not an executable interpreter; set PYTHON=/path/to/python"
}

# ------------------------------------------------------------------------------------------- staging
# Thousands of small PNGs read every epoch from a shared filesystem are slow and hurt other users, so the
# dataset is copied once to node-local disk. A copy is only trusted when its fingerprint (file count, total
# bytes, and a checksum of the sorted path/size/mtime listing, which also catches a renamed or edited file)
# equals the source's, and the marker holding that fingerprint is written only after such a check.

# Prints "FILES BYTES CHECKSUM" for the regular files under $1.
tree_fingerprint() {
  local listing counts
  # mtime in whole seconds: rsync -a and cp -a keep it, but not every filesystem keeps nanoseconds
  listing=$(cd "$1" && find . -type f -printf '%P\t%s\t%T@\n' \
            | awk -F'\t' '{ sub(/\..*/, "", $3); print $1 "\t" $2 "\t" $3 }' | LC_ALL=C sort) || return 1
  counts=$(printf '%s' "$listing" | awk -F'\t' 'NF { n++; b += $2 } END { printf "%d %.0f", n, b }')
  printf '%s %s\n' "$counts" "$(printf '%s' "$listing" | cksum | cut -d' ' -f1)"
}

stage_base() {
  if [[ -n ${STAGE_DIR:-} ]]; then echo "$STAGE_DIR"
  elif [[ -n ${SLURM_TMPDIR:-} ]]; then echo "$SLURM_TMPDIR"
  elif [[ -n ${TMPDIR:-} ]]; then echo "$TMPDIR"
  else echo "/tmp/${USER:-$(id -un)}"; fi
}

# The node disk must hold what is still missing plus a 4 KiB block per file (PNGs are small, so block
# rounding is real) plus a reserve for everything else the job writes there.
enough_space() {
  local src_files=$1 src_bytes=$2 dst=$3 have_bytes=0 need free
  [[ -d $dst ]] && have_bytes=$(tree_fingerprint "$dst" | cut -d' ' -f2)
  need=$(( src_bytes - have_bytes + src_files * 4096 + ${STAGE_RESERVE_MB:-1024} * 1024 * 1024 ))
  free=$(df -PB1 "$(dirname "$dst")" | awk 'NR == 2 { print $4 }')
  if (( free < need )); then
    warn "not enough space under $(dirname "$dst"): $(( free >> 20 )) MiB free, $(( need >> 20 )) MiB needed"
    return 1
  fi
}

# rsync resumes a partial copy and --delete removes files the source no longer has. Without rsync, cp -a
# cannot resume or delete, so it starts from an empty directory. Shared datasets are often read-only; a copy
# that kept those modes could be neither re-synced nor deleted by its owner, hence u+w.
copy_tree() {
  local src=$1 dst=$2
  if command -v rsync >/dev/null; then
    log "staging: copying $src -> $dst with rsync"
    mkdir -p "$dst" && rsync -a --delete --chmod=u+w "$src/" "$dst/"
  else
    warn "rsync not found; staging with cp -a (a partial copy is redone from scratch, not resumed)"
    { [[ ! -e $dst ]] || { chmod -R u+w "$dst" && rm -rf "$dst"; }; } && mkdir -p "$dst" && cp -a "$src/." "$dst/" \
      && chmod -R u+w "$dst"
  fi
}

# Sets STAGED_ROOT on success; returns 1 (caller falls back to the shared path) on any failure.
# The lock is held for the whole job: shared while the copy is in use, exclusive only while copying, so a
# job never re-syncs (rsync --delete) a copy that another job on this node is training from.
staged_path() {  # the node-local copy of dataset $1 (an absolute path)
  printf '%s/helico-stage/%s-%s\n' "$(stage_base)" "$(basename "$1")" "$(printf '%s' "$1" | cksum | cut -d' ' -f1)"
}

stage_dataset() {
  local src=$1 base dst
  base=$(stage_base)
  dst=$(staged_path "$src")
  mkdir -p "$base/helico-stage" || { warn "cannot create $base/helico-stage"; return 1; }
  command -v flock >/dev/null || { warn "flock not found; cannot stage safely"; return 1; }
  exec {LOCK_FD}>>"$dst.lock" || { warn "cannot open lock file $dst.lock"; return 1; }
  if stage_under_lock "$src" "$dst"; then STAGED_ROOT=$dst; return 0; fi
  exec {LOCK_FD}>&-  # closing the descriptor releases the lock: we will not use the copy
  return 1
}

stage_under_lock() {
  local src=$1 dst=$2 marker=$2.complete src_fp timeout=${STAGE_LOCK_TIMEOUT:-7200}
  log "staging: fingerprinting $src"
  src_fp=$(tree_fingerprint "$src") || { warn "cannot list $src"; return 1; }
  lock_stage -s "$dst.lock" "$timeout" || { warn "timed out after ${timeout}s waiting for the staging lock"; return 1; }
  if staged_copy_matches "$dst" "$marker" "$src_fp"; then
    log "staging: reusing verified copy at $dst (marker matches source: ${src_fp% *})"
    return 0
  fi
  flock -u "$LOCK_FD"
  lock_stage -x "$dst.lock" "$timeout" || { warn "timed out after ${timeout}s waiting for the staging lock"; return 1; }
  if ! staged_copy_matches "$dst" "$marker" "$src_fp"; then  # another job may have finished it while we waited
    if [[ -e $marker || -d $dst ]]; then log "staging: copy at $dst is incomplete or stale; not trusted, re-syncing"; fi
    rm -f "$marker" || return 1
    local files bytes got
    read -r files bytes _ <<<"$src_fp"
    enough_space "$files" "$bytes" "$dst" || return 1
    copy_tree "$src" "$dst" || { warn "copy to $dst failed"; return 1; }
    got=$(tree_fingerprint "$dst") || return 1
    if [[ $got != "$src_fp" ]]; then
      warn "staged copy does not match the source (files bytes checksum: $got vs $src_fp)"; return 1
    fi
    { printf '%s\n' "$src_fp" >"$marker.tmp" && mv -f "$marker.tmp" "$marker"; } || return 1
    log "staging: verified $dst ($files files, $bytes bytes), marker written"
  else
    log "staging: another job finished the copy while we waited; reusing $dst"
  fi
  flock -s "$LOCK_FD"  # downgrade: other jobs may now reuse the copy, but not re-sync it under us
}

# flock on LOCK_FD ($1: -s or -x), then check the lock file is still the one at its path: --clean-stage removes it
# once it holds it, and a lock on a removed file excludes nobody (the next job opens a new one), so reopen and retry.
lock_stage() {
  local mode=$1 file=$2 timeout=$3
  while :; do
    flock "$mode" -w "$timeout" "$LOCK_FD" || return 1
    [[ $(stat -c %i "$file" 2>/dev/null) == "$(stat -L -c %i "/dev/fd/$LOCK_FD")" ]] && return 0
    exec {LOCK_FD}>&- && exec {LOCK_FD}>>"$file" || return 1
  done
}

staged_copy_matches() {
  local dst=$1 marker=$2 src_fp=$3
  [[ -f $marker && -d $dst ]] || return 1
  [[ $(cat "$marker") == "$src_fp" ]] || return 1
  [[ $(tree_fingerprint "$dst") == "$src_fp" ]]
}

resolve_source_root() {
  local src=${ARG_DATA_ROOT:-${HELICO_DATA:-}}
  [[ -n $src ]] || die 2 "HELICO_DATA is not set: export HELICO_DATA=/path/to/HelicoDataSet (or pass --data-root)"
  [[ -d $src ]] || die 2 "dataset root $src (HELICO_DATA / --data-root) is not a directory"
  SOURCE_ROOT=$(cd "$src" && pwd)
}

resolve_data_root() {
  resolve_source_root
  DATA_ROOT=$SOURCE_ROOT
  if [[ ${STAGE_DIR:-} == off ]]; then
    log "staging: STAGE_DIR=off, reading $SOURCE_ROOT directly"
  elif stage_dataset "$SOURCE_ROOT"; then
    DATA_ROOT=$STAGED_ROOT
    trap report_staged_copy EXIT  # on every way out, so a failed job also says what it leaves on the node
  else
    warn "staging failed; training from the shared path $SOURCE_ROOT (slower, loads the shared filesystem)"
  fi
  export HELICO_DATA=$DATA_ROOT
}

# Staged copies are kept for the next job on this node; say where, how big, and how to remove them.
report_staged_copy() {
  local size caches=()
  for size in "$STAGED_ROOT"-cache*; do [[ ! -d $size ]] || caches+=("$size"); done
  size=$(du -shc "$STAGED_ROOT" ${caches[@]+"${caches[@]}"} 2>/dev/null | tail -n 1 | cut -f1) || true
  log "staged copy kept on $(hostname) for the next job: $STAGED_ROOT${caches[0]+ and its cache ${caches[*]}}" \
      "(${size:-?} in all); remove it with: HELICO_DATA=$SOURCE_ROOT bash $CODE_DIR/run_h_pylori.sh --clean-stage" \
      "(on this node; it refuses while a job uses the copy)"
}

# Removes this dataset's staged copy, marker, caches and lock file, holding the staging lock exclusively so no job on
# this node is using it. A job blocked on the removed lock file finds it gone once it gets the lock and takes a new
# one (lock_stage), so mutual exclusion holds.
clean_stage() {
  resolve_source_root
  local dst; dst=$(staged_path "$SOURCE_ROOT")
  if [[ ! -e $dst && ! -e $dst.complete ]] && ! compgen -G "$dst-cache*" >/dev/null; then
    log "clean-stage: no staged copy of $SOURCE_ROOT at $dst"; list_other_copies "$dst"; return 0
  fi
  command -v flock >/dev/null || die 5 "flock not found: cannot check that no job uses $dst; not removed"
  exec {LOCK_FD}>>"$dst.lock" || die 5 "cannot open the lock file $dst.lock; not removed"
  flock -x -n "$LOCK_FD" || die 5 "$dst is in use by a job on this node (staging lock held); not removed: run" \
                                 "--clean-stage again after that job ends"
  rm -f "$dst.complete"  # first: a half-removed copy must never look verified
  chmod -R u+w "$dst" "$dst"-cache* 2>/dev/null || true
  rm -rf "$dst" "$dst"-cache* || die 5 "could not remove all of $dst (error above)"
  rm -f "$dst.lock"  # last, still held: see lock_stage
  log "clean-stage: removed $dst, its marker and caches"
  list_other_copies "$dst"
}

list_other_copies() {
  local base; base=$(dirname "$1")
  local others=("$base"/*.complete)
  [[ -e ${others[0]} ]] || return 0
  log "clean-stage: other staged copies under $base: ${others[*]%.complete} (run --clean-stage with their" \
      "HELICO_DATA, or rm -rf them when no job on this node uses them)"
}

# ------------------------------------------------------------------------------------------- cache
# Decoded once into one uint8 file on the node's disk: every epoch and the evaluation then read it instead of ~220k
# PNGs. train.py names the folder under the base (its image size, cache kind and stain reference: its own defaults and
# rules) and builds or reuses it; evaluate.py finds the same folder from the checkpoint. Both fall back to PNGs, with a
# warning, when the node's disk has no room. EVAL_CACHE_ARGS: what evaluate.py gets.
EVAL_CACHE_ARGS=()
cache_args() {
  if [[ -n $ARG_CACHE ]]; then
    EVAL_CACHE_ARGS=(--cache "$ARG_CACHE"); log "cache: --cache $ARG_CACHE (train.py builds it)"; return 0
  fi
  if [[ ${CACHE:-on} == off ]]; then log "cache: CACHE=off, training decodes PNGs"; return 0; fi
  if [[ $DATA_ROOT == "$SOURCE_ROOT" ]]; then
    warn "cache: no node-local copy of the data (staging off or failed), so no cache; training decodes PNGs"
    return 0
  fi
  TRAIN_ARGS+=(--cache-base "$DATA_ROOT-cache") EVAL_CACHE_ARGS=(--cache-base "$DATA_ROOT-cache")
  log "cache: --cache-base $DATA_ROOT-cache (train.py builds or reuses its cache there)"
}

# ------------------------------------------------------------------------------------------- training
# The GPUs this job may use, never a guess: SLURM_GPUS_ON_NODE is set only when --gres/--gpus allocated some; else
# CUDA_VISIBLE_DEVICES lists them ("" or -1: none); a SLURM job with neither has none; outside SLURM, nvidia-smi
# counts the node's. 0 means a CPU run (one process).
count_gpus() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    awk -F, '{ n = 0; for (i = 1; i <= NF; i++) if ($i != "" && $i != "-1") n++; print n }' <<<"$CUDA_VISIBLE_DEVICES"
  elif [[ -n ${SLURM_JOB_ID:-} ]] || ! command -v nvidia-smi >/dev/null; then echo 0
  else nvidia-smi -L 2>/dev/null | awk '/^GPU / { n++ } END { print n + 0 }'; fi
}

# srun inside the job no longer inherits --cpus-per-task (Slurm >= 22.05) unless told; and without a
# thread count each of N processes would start one BLAS/OpenMP thread per core of the whole node.
export_thread_counts() {
  local nproc=$(( $1 > 1 ? $1 : 1 )) cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
  [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  local per=$(( cpus / nproc )); (( per >= 1 )) || per=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$per} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$per}
}

# --signal=B:USR1 reaches only this batch shell, and bash runs a trap only between commands, so training
# runs in the background and the shell waits on it: `wait` returns early when a trapped signal arrives.
CHILD_PID="" CHILD_IS_TORCHRUN=0 STOP_REQUESTED=0 STOP_TIME=0
on_usr1() {
  (( STOP_REQUESTED )) || STOP_TIME=$(date +%s)  # the first request: a later TERM (SLURM requeueing) must not move it
  STOP_REQUESTED=1
  [[ -n $CHILD_PID ]] || { log "USR1 received while training was not running"; return 0; }
  log "USR1 received: asking training to checkpoint and requeue"
  # torchrun would treat USR1 as a failure and kill its workers, so signal the workers (its children) directly.
  if (( CHILD_IS_TORCHRUN )); then pkill -USR1 -P "$CHILD_PID" || true; else kill -USR1 "$CHILD_PID" || true; fi
}
# Background jobs of a script ignore SIGINT, so Ctrl-C is turned into TERM, which train.py and torchrun handle.
# Under SLURM, scancel and the time limit already send TERM to every process of the job: forwarding it too
# would be a second signal, which makes train.py exit without its checkpoint.
on_int_or_term() {
  (( STOP_REQUESTED )) || STOP_TIME=$(date +%s)  # the first request: a later TERM (SLURM requeueing) must not move it
  STOP_REQUESTED=1
  [[ -n $CHILD_PID ]] || exit $(( $1 == 2 ? 130 : 143 ))
  if [[ $1 == 2 || -z ${SLURM_JOB_ID:-} ]]; then kill -TERM "$CHILD_PID" 2>/dev/null || true; fi
}

# A USR1 that arrives while staging or auditing (trap deferred until that step ends) still deserves a requeue.
requeue_before_training() {
  log "stop requested before training started"
  if [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null; then
    log "requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
}

run_forwarding_signals() {
  "$@" &
  CHILD_PID=$!
  local rc
  while :; do
    rc=0; wait "$CHILD_PID" || rc=$?
    kill -0 "$CHILD_PID" 2>/dev/null || break  # still alive: the wait was cut short by a trapped signal
  done
  rc=0; wait "$CHILD_PID" || rc=$?  # bash remembers the exit status of a finished background job
  CHILD_PID=""
  return "$rc"
}

# What an exit code of any step means and what to do about it: one table for audit, training, evaluation (the codes
# every script of the project shares; see the README's exit-code table). Python exits 1 on an uncaught exception too:
# the scripts turn OSError and ImportError into 5 and 2 themselves, so a 1 with a traceback can only be a bug.
exit_meaning() {
  local step=$1 rc=$2
  case $rc in
    0) echo "done" ;;
    1) if [[ $step == audit_leakage.py ]]; then echo "a patient leak in this split (report above): fix the split"
       else echo "the HoldOut is not independent of CrossValidation (patients named above)"; fi
       echo "(a traceback above instead: crashed, a bug)" ;;
    2) echo "bad input (the flag, file, folder or module named above): fix it, then submit again" ;;
    3) echo "non-finite loss (the last good checkpoint is kept in $RUNS/$RUN_ID): lower --lr, then run the same command" ;;
    4) echo "stopped by a signal after writing last.pt: run the same command to resume" ;;
    5) echo "environment fault (no space left or I/O error, folder named above): free space, then run the same" \
            "command to resume" ;;
    *) if (( rc > 128 )); then
         echo "killed by signal $(( rc - 128 )) ($(kill -l $(( rc - 128 )) 2>/dev/null || echo '?')), e.g. out of memory," \
              "the time limit or a second signal: run the same command to resume from the last checkpoint written"
       else echo "crashed (exit $rc): a bug, the traceback is above"; fi ;;
  esac
}

step_failed() {  # exits with the step's own code, so the job's exit code means what the step's does
  local step=$1 rc=$2 what=${3:-}
  die "$rc" "$step exited $rc: $(exit_meaning "$step" "$rc" | paste -sd' ')${what:+; $what}${FOLD_NOTE:+. $FOLD_NOTE}"
}

run_audit() {
  log "audit: checking the split for patients shared between its parts (train/validation/test)"
  local rc=0
  "$PY" "$CODE_DIR/audit_leakage.py" "${TRAIN_ARGS[@]}" || rc=$?  # train.py's very arguments
  (( rc == 0 )) || step_failed audit_leakage.py "$rc" "not training"
}

run_training() {
  local ngpu; ngpu=$(count_gpus)
  export_thread_counts "$ngpu"
  local cmd=("$PY" "$CODE_DIR/train.py" "${TRAIN_ARGS[@]}")
  if (( ngpu > 1 )); then
    # python -m torch.distributed.run is torchrun from this interpreter's torch, whatever is on PATH.
    cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$ngpu" "${cmd[@]:1}")
    CHILD_IS_TORCHRUN=1
  fi
  log "train: ${cmd[*]}"
  log "train: GPUs: $ngpu$( (( ngpu )) || echo ' (none allocated or visible: CPU run)'), processes: $(( ngpu > 1 ? ngpu : 1 ))," \
      "OMP_NUM_THREADS=$OMP_NUM_THREADS, SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}"
  run_forwarding_signals "${cmd[@]}"
}

last_checkpoint_since() {
  local last=$RUNS/$RUN_ID/last.pt
  [[ -f $last ]] && (( $(stat -c %Y "$last") >= $1 ))
}

# train.py runs `scontrol requeue` after saving; SLURM then stops the job (TERM to every process, so train.py often
# ends with 143) and starts it again. The job's restart count, higher than this run's, says that happened.
job_was_requeued() {
  [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null || return 1
  local restarts
  restarts=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2) || return 1
  (( ${restarts:-0} > ${SLURM_RESTART_COUNT:-0} ))
}

# After a stop request the exit code alone does not tell the story: a checkpoint written since the stop means
# the run can resume, whatever code the process died with.
report_stop() {
  local rc=$1 checkpointed=0
  last_checkpoint_since "$STOP_TIME" && checkpointed=1
  if (( rc == 4 || (rc > 128 && checkpointed) )) && job_was_requeued; then
    log "stopped by a signal: training wrote $RUNS/$RUN_ID/last.pt and job $SLURM_JOB_ID was requeued (training" \
        "exited $rc); SLURM starts it again and it resumes from last.pt by itself; evaluation skipped"
    return 4
  fi
  if (( rc == 4 || (rc > 128 && checkpointed) )); then
    local how="run the same command to resume"
    [[ -z ${SLURM_JOB_ID:-} ]] || how="job $SLURM_JOB_ID was not requeued (see above): submit the same command again to resume"
    log "stopped by a signal: training wrote $RUNS/$RUN_ID/last.pt (exited $rc); evaluation skipped; $how"
    return 4
  fi
  (( rc != 0 )) || { log "stop requested after training finished; evaluation skipped: run the same command to evaluate"; return 0; }
  step_failed train.py "$rc" "stopped without a new checkpoint; evaluation skipped"
}

# The patient model (gated-attention MIL over each patient's bag of features of this run's best.pt), in the same job,
# before the evaluation that reports it beside the patient rule; per fold under an array. --no-patient-model skips it.
run_patient_model() {
  local best=$RUNS/$RUN_ID/best.pt
  [[ $PATIENT_MODEL == on && -f $best ]] || return 0
  log "patient model: train_patient.py --checkpoint $best"
  local rc=0
  "$PY" "$CODE_DIR/train_patient.py" --checkpoint "$best" --data-root "$DATA_ROOT" \
    ${EVAL_CACHE_ARGS[@]+"${EVAL_CACHE_ARGS[@]}"} || rc=$?
  (( rc == 0 )) || step_failed train_patient.py "$rc" "the patch model is complete ($best)"
}

run_evaluation() {
  local best=$RUNS/$RUN_ID/best.pt
  if [[ ! -f $best ]]; then warn "no $best; skipping evaluation"; return 0; fi
  local extra=()
  read -ra extra <<<"${EVAL_ARGS:-}"
  log "evaluate: $best ${EVAL_ARGS:-}"
  # ${a[@]+"${a[@]}"}: an empty array is an "unbound variable" under set -u in bash < 4.4 (still on clusters)
  extra+=(${EVAL_CACHE_ARGS[@]+"${EVAL_CACHE_ARGS[@]}"})
  local rc=0
  "$PY" "$CODE_DIR/evaluate.py" --checkpoint "$best" --data-root "$DATA_ROOT" ${extra[@]+"${extra[@]}"} || rc=$?
  (( rc == 0 )) || step_failed evaluate.py "$rc" "training is complete ($best)"
}

# ------------------------------------------------------------------------------------------- cross-validation
# The array's first task submits the finishing job once (a requeued task finds the marker naming its array job). It
# waits for the whole array to end well (afterok); a failed task makes that impossible and SLURM cancels it
# (--kill-on-invalid-dep), so a failed fold stops it, and the failed task's own error line says so.
submit_finish_cv() {
  [[ -n $CV_ID && -n ${SLURM_ARRAY_JOB_ID:-} ]] || return 0
  local k; k=$(flag_value --folds)
  FOLD_NOTE="fold $SLURM_ARRAY_TASK_ID of $RUNS/$CV_ID-f* failed, so the cross-validation's evaluation will not run:"
  FOLD_NOTE+=" fix it, run this fold again, then: bash $CODE_DIR/run_h_pylori.sh --finish-cv --run-id $CV_ID --folds $k"
  [[ $SLURM_ARRAY_TASK_ID == "${SLURM_ARRAY_TASK_MIN:-0}" ]] || return 0
  local marker=$RUNS/$CV_ID-cv.job previous=""
  previous=$(cat "$marker" 2>/dev/null) || true
  if [[ ${previous%% *} == "$SLURM_ARRAY_JOB_ID" ]]; then
    log "cross-validation: job ${previous#* } already waits for array $SLURM_ARRAY_JOB_ID"; return 0
  fi
  local opts=(--parsable --dependency="afterok:$SLURM_ARRAY_JOB_ID" --kill-on-invalid-dep=yes
              --job-name="${SLURM_JOB_NAME:-h-pylori}-cv" --chdir="$PWD" --output="$RUNS/slurm-%j.out")
  [[ -z ${SLURM_CPUS_PER_TASK:-} ]] || opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  [[ -z ${SLURM_MEM_PER_NODE:-} ]] || opts+=(--mem="${SLURM_MEM_PER_NODE}M")
  [[ -z ${SLURM_JOB_PARTITION:-} ]] || opts+=(--partition="$SLURM_JOB_PARTITION")
  [[ -n ${SLURM_GPUS_ON_NODE:-} && ${SLURM_GPUS_ON_NODE:-0} != 0 ]] || opts+=(--gres=none)
  local extra=() job unset=()
  read -ra extra <<<"${CV_SBATCH_ARGS:-}"
  # this task's SLURM_* would describe the new job wrongly (sbatch and the job read some of them)
  for job in $(compgen -e | grep '^SLURM_' | grep -vx 'SLURM_CONF'); do unset+=(-u "$job"); done
  # from the code's folder, as the array was: the spooled copy finds evaluate.py through SLURM_SUBMIT_DIR
  job=$(cd "$CODE_DIR" && env ${unset[@]+"${unset[@]}"} sbatch "${opts[@]}" ${extra[@]+"${extra[@]}"} \
        "$CODE_DIR/run_h_pylori.sh" --finish-cv --run-id "$CV_ID" --folds "$k" --runs-dir "$RUNS" \
        ${ARG_DATA_ROOT:+--data-root "$ARG_DATA_ROOT"}) \
    || { warn "cross-validation: could not submit its evaluation job (sbatch failed, above); once every fold has" \
              "finished run: bash $CODE_DIR/run_h_pylori.sh --finish-cv --run-id $CV_ID --folds $k"; return 0; }
  job=${job%%;*}
  mkdir -p "$RUNS" && printf '%s %s\n' "$SLURM_ARRAY_JOB_ID" "$job" >"$marker.tmp" && mv -f "$marker.tmp" "$marker"
  log "cross-validation: job $job runs once every task of array $SLURM_ARRAY_JOB_ID has ended well:" \
      "evaluate.py --cv -> $RUNS/$CV_ID-cv/, evaluate.py --holdout --ensemble -> $RUNS/$CV_ID-ensemble/"
}

# --finish-cv --run-id 27 --folds K: every fold of runs/27-f* has its best.pt, the data is staged, then the pooled
# out-of-fold evaluation and the HoldOut ensemble, one look each (evaluate.py reuses each fold's own eval/).
finish_cv() {
  local k runs=() missing=() i
  k=$(flag_value --folds) || die 2 "--finish-cv: give --folds K (the folds of --run-id's cross-validation)"
  [[ $k =~ ^[0-9]+$ ]] && (( k >= 2 )) || die 2 "--finish-cv: --folds $k: expected a number of folds >= 2"
  [[ -n $RUN_ID ]] || die 2 "--finish-cv: give --run-id (27 for the fold runs runs/27-f0 ... runs/27-f$(( k - 1 )))"
  for (( i = 0; i < k; i++ )); do
    runs+=("$RUNS/$RUN_ID-f$i")
    [[ -f $RUNS/$RUN_ID-f$i/best.pt ]] || missing+=("$i")
  done
  (( ${#missing[@]} == 0 )) || die 2 "--finish-cv: fold ${missing[*]} ($RUNS/$RUN_ID-f${missing[0]}${missing[1]+ ...})" \
    "has no best.pt: it did not finish (see its log); run it again, then run --finish-cv again"
  resolve_data_root
  local extra=() cv=() rc=0 a
  read -ra extra <<<"${EVAL_ARGS:-}"
  for a in ${extra[@]+"${extra[@]}"}; do [[ $a == --holdout ]] || cv+=("$a"); done
  log "cross-validation: evaluate.py --cv ${runs[*]}"
  "$PY" "$CODE_DIR/evaluate.py" --cv "${runs[@]}" --data-root "$DATA_ROOT" ${cv[@]+"${cv[@]}"} || rc=$?
  (( rc == 0 )) || step_failed "evaluate.py --cv" "$rc" "the folds are complete (${runs[*]})"
  log "cross-validation: evaluate.py --holdout --ensemble ${runs[*]}"
  "$PY" "$CODE_DIR/evaluate.py" --holdout --ensemble "${runs[@]}" --data-root "$DATA_ROOT" \
    ${cv[@]+"${cv[@]}"} || rc=$?
  (( rc == 0 )) || step_failed "evaluate.py --holdout --ensemble" "$rc" "$RUNS/$RUN_ID-cv/ is written"
  log "done: $RUNS/$RUN_ID-cv, $RUNS/$RUN_ID-ensemble"
}

main() {
  local arg
  for arg in "$@"; do
    case $arg in
      -h|--help) usage; exit 0 ;;
      --stage-only) MODE=stage ;;
      --clean-stage) MODE=clean ;;
      --finish-cv) MODE=finish ;;
    esac
  done
  find_code_dir
  if [[ $MODE == clean ]]; then parse_args "$@"; clean_stage; return 0; fi
  trap on_usr1 USR1
  trap 'on_int_or_term 2' INT
  trap 'on_int_or_term 15' TERM
  log "host $(hostname), job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}), code $CODE_DIR" \
      "at $(git -C "$CODE_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [[ $MODE == stage ]]; then parse_args "$@"; resolve_data_root; echo "$DATA_ROOT"; return 0; fi
  pick_python
  parse_args "$@"
  if [[ $MODE == finish ]]; then RUNS=${ARG_RUNS_DIR:-${RUNS_DIR:-runs}}; finish_cv; return 0; fi
  [[ -n $RUN_ID ]] || RUN_ID=${SLURM_JOB_ID:-}  # train.py's own default: a requeued job keeps its ID
  [[ -n $RUN_ID ]] || die 2 "--run-id is required outside SLURM (the run folder to write and to resume from)"
  array_fold
  RUNS=${ARG_RUNS_DIR:-${RUNS_DIR:-runs}}
  TRAIN_ARGS=(--runs-dir "$RUNS" --run-id "$RUN_ID" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  [[ ${CACHE:-on} == on || ${CACHE:-on} == off ]] || die 2 "CACHE=$CACHE: expected on or off"
  check_flags
  submit_finish_cv  # before staging: it passes on HELICO_DATA as given, not this node's copy
  resolve_data_root
  TRAIN_ARGS=(--data-root "$DATA_ROOT" "${TRAIN_ARGS[@]}")
  cache_args
  run_audit
  (( STOP_REQUESTED == 0 )) || requeue_before_training
  local rc=0
  run_training || rc=$?
  if (( STOP_REQUESTED )); then
    # torchrun turns any worker's non-zero exit, train.py's 4 included, into 1 (which here means "leak")
    if (( CHILD_IS_TORCHRUN && rc != 0 )) && last_checkpoint_since "$STOP_TIME"; then rc=4; fi
    report_stop "$rc" || return $?
    return 0
  fi
  (( rc == 0 )) || step_failed train.py "$rc"
  run_patient_model
  run_evaluation
  log "done: $RUNS/$RUN_ID"
}

main "$@"
