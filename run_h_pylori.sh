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
#   HELICO_DATA=demo_data bash run_h_pylori.sh --run-id demo --device cpu --epochs 1   # no SLURM needed
#   bash run_h_pylori.sh --stage-only          # only stage (pre-warm a node); prints the staged path
#
# Every argument goes to train.py (see `python train.py --help`); the split flags among them (--split,
# --split-seed, --val-frac, --folds, --fold, --reference-patch, --hash-cache) also go to audit_leakage.py,
# so the audit checks exactly the split that will be trained. Write flags in full (no argparse abbreviations).
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
#   EVAL_ARGS          extra evaluate.py flags, split on spaces (e.g. "--holdout --bootstrap 2000")
#   CACHE              on (default) or off. on: after the audit, build or reuse the packed patch cache (patch_cache.py,
#                      ~0.2 MB per 256px patch, ~43 GB for the full dataset) beside the staged copy, as
#                      <staged copy>-cache<image size>-macenko-<reference checksum> (Macenko applied once, there: the
#                      default; plain <staged copy>-cache<image size> with --no-macenko or --no-cache-normalized), and
#                      pass --cache to train.py and evaluate.py, so no epoch decodes a PNG. Only for a staged copy: a cache
#                      belongs on node-local disk, never beside HELICO_DATA. Without a staged copy, or when the build
#                      fails (no room), training decodes PNGs, with a warning. An explicit --cache DIR wins.
#
# Exit codes: 0 ok; 1 the audit found a patient leak (nothing trained); 2 bad input; otherwise the failing
# step's own exit code. After USR1 (or Ctrl-C) train.py writes last.pt and exits 4 (and requeues itself
# under SLURM); the script then skips evaluation and exits with train.py's code.
set -euo pipefail

log() { printf '[run_h_pylori %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }  # stdout is left to the steps
warn() { printf '[run_h_pylori %s] WARNING: %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { local code=$1; shift; printf 'error: %s\n' "$*" >&2; exit "$code"; }

# The usage text is the comment block under the #SBATCH lines, so it cannot drift from the documentation.
usage() { awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }

# ------------------------------------------------------------------------------------------- arguments
# Split flags are copied to the audit; --data-root and --runs-dir are taken out because this script decides
# them (the staged copy; RUNS_DIR); everything else passes through to train.py untouched, in order.
TRAIN_ARGS=() AUDIT_ARGS=() RUN_ID="" ARG_DATA_ROOT="" ARG_RUNS_DIR="" STAGE_ONLY=0
# CACHE_NORMALIZED: 1/0 when asked for (--cache-normalized / --no-cache-normalized or --no-macenko); empty: the
# default, a Macenko-normalized cache (Macenko once, not every epoch), as train.py's own default with --cache
ARG_CACHE="" IMAGE_SIZE=256 REFERENCE="" CACHE_NORMALIZED=""  # 256: train.py's default --image-size
parse_args() {
  local arg name value
  while (( $# )); do
    arg=$1
    case $arg in
      -h|--help) usage; exit 0 ;;
      --stage-only) STAGE_ONLY=1; shift; continue ;;
      --cache-normalized) CACHE_NORMALIZED=1; shift; continue ;;  # given to train.py only with a cache
      --no-cache-normalized) CACHE_NORMALIZED=0; shift; continue ;;
      --no-macenko) CACHE_NORMALIZED=0 ;;  # and on to train.py
    esac
    name=${arg%%=*}
    case $name in
      --data-root|--runs-dir|--run-id|--split|--split-seed|--val-frac|--folds|--fold|--reference-patch|--hash-cache\
      |--cache|--image-size)
        if [[ $arg == *=* ]]; then value=${arg#*=}; shift
        else
          (( $# >= 2 )) || die 2 "flag $name needs a value"
          value=$2; shift 2
        fi
        case $name in
          --data-root) ARG_DATA_ROOT=$value ;;
          --runs-dir) ARG_RUNS_DIR=$value ;;
          --run-id) RUN_ID=$value; TRAIN_ARGS+=(--run-id "$value") ;;
          --cache) ARG_CACHE=$value ;;
          --image-size) IMAGE_SIZE=$value; TRAIN_ARGS+=(--image-size "$value") ;;
          --reference-patch) REFERENCE=$value; TRAIN_ARGS+=("$name" "$value"); AUDIT_ARGS+=("$name" "$value") ;;
          *) TRAIN_ARGS+=("$name" "$value"); AUDIT_ARGS+=("$name" "$value") ;;
        esac ;;
      *) TRAIN_ARGS+=("$arg"); shift ;;
    esac
  done
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
stage_dataset() {
  local src=$1 base dst
  base=$(stage_base)
  dst=$base/helico-stage/$(basename "$src")-$(printf '%s' "$src" | cksum | cut -d' ' -f1)
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
  flock -s -w "$timeout" "$LOCK_FD" || { warn "timed out after ${timeout}s waiting for the staging lock"; return 1; }
  if staged_copy_matches "$dst" "$marker" "$src_fp"; then
    log "staging: reusing verified copy at $dst (marker matches source: ${src_fp% *})"
    return 0
  fi
  flock -u "$LOCK_FD"
  flock -x -w "$timeout" "$LOCK_FD" || { warn "timed out after ${timeout}s waiting for the staging lock"; return 1; }
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

staged_copy_matches() {
  local dst=$1 marker=$2 src_fp=$3
  [[ -f $marker && -d $dst ]] || return 1
  [[ $(cat "$marker") == "$src_fp" ]] || return 1
  [[ $(tree_fingerprint "$dst") == "$src_fp" ]]
}

resolve_data_root() {
  local src=${ARG_DATA_ROOT:-${HELICO_DATA:-}}
  [[ -n $src ]] || die 2 "HELICO_DATA is not set: export HELICO_DATA=/path/to/HelicoDataSet (or pass --data-root)"
  [[ -d $src ]] || die 2 "dataset root $src (HELICO_DATA / --data-root) is not a directory"
  SOURCE_ROOT=$(cd "$src" && pwd)
  DATA_ROOT=$SOURCE_ROOT
  if [[ ${STAGE_DIR:-} == off ]]; then
    log "staging: STAGE_DIR=off, reading $SOURCE_ROOT directly"
  elif stage_dataset "$SOURCE_ROOT"; then
    DATA_ROOT=$STAGED_ROOT
  else
    warn "staging failed; training from the shared path $SOURCE_ROOT (slower, loads the shared filesystem)"
  fi
  export HELICO_DATA=$DATA_ROOT
}

# ------------------------------------------------------------------------------------------- cache
# Decoded once into one uint8 file on the node's disk (patch_cache.py): every epoch and the evaluation then read
# it instead of ~220k PNGs. The folder name carries what the cache holds, so jobs with another image size or stain
# reference on this node use their own (patch_cache refuses to turn a finished cache into another kind).
CACHE_DIR=""
build_cache() {
  if [[ -n $ARG_CACHE ]]; then CACHE_DIR=$ARG_CACHE; log "cache: --cache $CACHE_DIR (train.py builds it)"; return 0; fi
  if [[ ${CACHE:-on} == off ]]; then log "cache: CACHE=off, training decodes PNGs"; return 0; fi
  if [[ $DATA_ROOT == "$SOURCE_ROOT" ]]; then
    warn "cache: no node-local copy of the data (staging off or failed), so no cache; training decodes PNGs"
    return 0
  fi
  local dir=$DATA_ROOT-cache$IMAGE_SIZE cmd
  cmd=("$PY" "$CODE_DIR/patch_cache.py" --data-root "$DATA_ROOT" --image-size "$IMAGE_SIZE"
       --workers "${SLURM_CPUS_PER_TASK:-$(nproc)}")
  if (( ${CACHE_NORMALIZED:-1} )); then
    dir+=-macenko-$(printf '%s' "${REFERENCE:-default}" | cksum | cut -d' ' -f1)
    cmd+=(--normalized)
    [[ -z $REFERENCE ]] || cmd+=(--reference-patch "$REFERENCE")
  fi
  log "cache: ${cmd[*]} --out $dir"
  if "${cmd[@]}" --out "$dir"; then CACHE_DIR=$dir
  else warn "cache: building $dir failed (above); training decodes PNGs"; fi
}

# ------------------------------------------------------------------------------------------- training
# SLURM_GPUS_ON_NODE is set by --gres; outside SLURM, CUDA_VISIBLE_DEVICES says what we may use.
count_gpus() {
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != -1 ]]; then
    awk -F, '{ print NF }' <<<"$CUDA_VISIBLE_DEVICES"
  else echo 1; fi
}

# srun inside the job no longer inherits --cpus-per-task (Slurm >= 22.05) unless told; and without a
# thread count each of N processes would start one BLAS/OpenMP thread per core of the whole node.
export_thread_counts() {
  local nproc=$1 cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
  [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  local per=$(( cpus / nproc )); (( per >= 1 )) || per=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$per} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$per}
}

# --signal=B:USR1 reaches only this batch shell, and bash runs a trap only between commands, so training
# runs in the background and the shell waits on it: `wait` returns early when a trapped signal arrives.
CHILD_PID="" CHILD_IS_TORCHRUN=0 STOP_REQUESTED=0 STOP_TIME=0
on_usr1() {
  STOP_REQUESTED=1 STOP_TIME=$(date +%s)
  [[ -n $CHILD_PID ]] || { log "USR1 received while training was not running"; return 0; }
  log "USR1 received: asking training to checkpoint and requeue"
  # torchrun would treat USR1 as a failure and kill its workers, so signal the workers (its children) directly.
  if (( CHILD_IS_TORCHRUN )); then pkill -USR1 -P "$CHILD_PID" || true; else kill -USR1 "$CHILD_PID" || true; fi
}
# Background jobs of a script ignore SIGINT, so Ctrl-C is turned into TERM, which train.py and torchrun handle.
# Under SLURM, scancel and the time limit already send TERM to every process of the job: forwarding it too
# would be a second signal, which makes train.py exit without its checkpoint.
on_int_or_term() {
  STOP_REQUESTED=1 STOP_TIME=$(date +%s)
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

run_audit() {
  log "audit: checking the split for patients shared between train and validation"
  local rc=0
  # ${a[@]+"${a[@]}"}: an empty array is an "unbound variable" under set -u in bash < 4.4 (still on clusters)
  "$PY" "$CODE_DIR/audit_leakage.py" --data-root "$DATA_ROOT" ${AUDIT_ARGS[@]+"${AUDIT_ARGS[@]}"} || rc=$?
  case $rc in
    0) ;;
    1) die 1 "audit_leakage.py found a patient leak in this split (report above); not training. Fix the split." ;;
    *) die "$rc" "audit_leakage.py failed with exit code $rc (report above); not training" ;;
  esac
}

run_training() {
  local ngpu; ngpu=$(count_gpus)
  export_thread_counts "$ngpu"
  local cmd=("$PY" "$CODE_DIR/train.py" --data-root "$DATA_ROOT" --runs-dir "$RUNS" "${TRAIN_ARGS[@]}")
  if [[ -n $CACHE_DIR ]]; then
    cmd+=(--cache "$CACHE_DIR")
    case ${CACHE_NORMALIZED:-$([[ -n $ARG_CACHE ]] || echo 1)} in  # --cache DIR unasked: train.py's own default
      1) cmd+=(--cache-normalized) ;;
      0) cmd+=(--no-cache-normalized) ;;
    esac
  elif [[ $CACHE_NORMALIZED == 1 ]]; then
    warn "no cache, so --cache-normalized is dropped: training normalizes on the device (same pixels)"
  fi
  if (( ngpu > 1 )); then
    # python -m torch.distributed.run is torchrun from this interpreter's torch, whatever is on PATH.
    cmd=("$PY" -m torch.distributed.run --standalone --nproc_per_node "$ngpu" "${cmd[@]:1}")
    CHILD_IS_TORCHRUN=1
  fi
  log "train: ${cmd[*]}"
  log "train: GPUs: $ngpu, OMP_NUM_THREADS=$OMP_NUM_THREADS, SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}"
  run_forwarding_signals "${cmd[@]}"
}

last_checkpoint_since() {
  local last=$RUNS/$RUN_ID/last.pt
  [[ -f $last ]] && (( $(stat -c %Y "$last") >= $1 ))
}

run_evaluation() {
  local best=$RUNS/$RUN_ID/best.pt
  if [[ ! -f $best ]]; then warn "no $best; skipping evaluation"; return 0; fi
  local extra=()
  read -ra extra <<<"${EVAL_ARGS:-}"
  log "evaluate: $best ${EVAL_ARGS:-}"
  [[ -z $CACHE_DIR ]] || extra+=(--cache "$CACHE_DIR")  # evaluate.py reads either kind of cache
  "$PY" "$CODE_DIR/evaluate.py" --checkpoint "$best" --data-root "$DATA_ROOT" ${extra[@]+"${extra[@]}"}
}

main() {
  parse_args "$@"
  find_code_dir
  trap on_usr1 USR1
  trap 'on_int_or_term 2' INT
  trap 'on_int_or_term 15' TERM
  log "host $(hostname), job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}), code $CODE_DIR" \
      "at $(git -C "$CODE_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if (( STAGE_ONLY )); then resolve_data_root; echo "$DATA_ROOT"; return 0; fi
  if [[ -z $RUN_ID && -n ${SLURM_JOB_ID:-} ]]; then  # train.py's own default: a requeued job keeps its ID
    RUN_ID=$SLURM_JOB_ID; TRAIN_ARGS+=(--run-id "$RUN_ID")
  fi
  [[ -n $RUN_ID ]] || die 2 "--run-id is required outside SLURM (the run folder to write and to resume from)"
  pick_python
  RUNS=${ARG_RUNS_DIR:-${RUNS_DIR:-runs}}
  [[ ${CACHE:-on} == on || ${CACHE:-on} == off ]] || die 2 "CACHE=$CACHE: expected on or off"
  resolve_data_root
  run_audit
  build_cache
  (( STOP_REQUESTED == 0 )) || requeue_before_training
  local rc=0
  run_training || rc=$?
  if (( STOP_REQUESTED )); then
    # torchrun turns any worker's non-zero exit, train.py's 4 included, into 1 (which here means "leak")
    if (( CHILD_IS_TORCHRUN && rc != 0 )) && last_checkpoint_since "$STOP_TIME"; then rc=4; fi
    log "stopped by a signal: training exited $rc; skipping evaluation (run the same command to resume)"
    return "$rc"
  fi
  (( rc == 0 )) || die "$rc" "train.py failed with exit code $rc"
  run_evaluation
  log "done: $RUNS/$RUN_ID"
}

main "$@"
