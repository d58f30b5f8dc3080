#!/usr/bin/env bash
# The GPU check in one command, for a machine with an NVIDIA GPU (e.g. a borrowed H200):
# builds oqfl_ext for that GPU's architecture only, runs the CUDA tests of python_tests/ and the
# CUDA benchmarks, and writes bench/results/device-<gpu>-<date>.md (GPU, driver, torch, commit,
# test counts and failures, benchmark tables, wall time of every step), copied to $OUT when set.
#
#   bash scripts/device_check.sh             # run (under 10 minutes on an H200 with 16 cores)
#   bash scripts/device_check.sh --dry-run   # print the plan and the exact commands, run nothing
#
# Python: $OQFL_PYTHON if set; else .venv/bin/python when its torch is a CUDA build that sees the
# GPU; else python3 when its torch does (a GPU machine's own image); else scripts/setup.sh makes
# .venv (needs the network). Every step runs under `timeout`, capped by what is left of the
# budget (OQFL_DEVICE_BUDGET seconds, default 540; 30 s are kept for the report); a step that
# fails or times out is recorded and the next one runs. OQFL_COMMIT names the commit in the
# report where the tree has no git metadata.
# Exit: 0 every step passed; 1 a test failed or a step failed / timed out; 2 no NVIDIA GPU here;
# 64 bad arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_check: unknown argument '$arg' (expected --dry-run or --help)" >&2; exit 64 ;;
  esac
done

BUDGET=${OQFL_DEVICE_BUDGET:-540}
REPORT_RESERVE=30
case "$BUDGET" in
  ''|*[!0-9]*) echo "device_check: OQFL_DEVICE_BUDGET must be a whole number of seconds, got '$BUDGET'" >&2
               exit 64 ;;
esac
START=$SECONDS
NPROC=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys those

# A command as one shell-readable line (words with spaces or shell characters single-quoted).
show() {
  local out="" w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+="$w "; else out+="'${w//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

# $OQFL_PYTHON as given, else the first interpreter whose torch is a CUDA build that sees a
# GPU (prints it), else nothing.
cuda_python() {
  local py
  if [ -n "${OQFL_PYTHON:-}" ]; then echo "$OQFL_PYTHON"; return 0; fi
  for py in .venv/bin/python python3; do
    if command -v "$py" >/dev/null 2>&1 && timeout 120 "$py" -c \
        'import sys, torch; sys.exit(not (torch.version.cuda and torch.cuda.is_available()))' \
        >/dev/null 2>&1; then
      echo "$py"
      return 0
    fi
  done
  return 0
}

# ------------------------------------------------------------------ the GPU
GPU_NAME="" CAP=""
if command -v nvidia-smi >/dev/null 2>&1; then
  line=$(timeout 30 nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null) \
    || line=""
  line=${line%%$'\n'*}  # the first GPU: the build targets one architecture
  if [[ "$line" == *,* ]]; then
    GPU_NAME=$(echo "${line%,*}" | xargs)
    CAP=$(echo "${line##*,}" | xargs)
  fi
fi
PY=""
if [ "$DRY_RUN" = 0 ]; then
  PY=$(cuda_python)
  if [[ ! "$CAP" =~ ^[0-9]+\.[0-9]+$ ]] && [ -n "$PY" ]; then
    # an old nvidia-smi without compute_cap, or none at all: ask torch
    CAP=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
    GPU_NAME=${GPU_NAME:-$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')}
  fi
  if [[ ! "$CAP" =~ ^[0-9]+\.[0-9]+$ ]]; then
    echo "device_check: no NVIDIA GPU found (nvidia-smi lists none and no torch here sees one);" \
         "this check needs a CUDA GPU. 'bash scripts/device_check.sh --dry-run' prints its plan." >&2
    exit 2
  fi
fi
[[ "$CAP" =~ ^[0-9]+\.[0-9]+$ ]] || CAP="<compute capability>"
PY_SHOWN=${PY:-"<python>"}
NEED_SETUP=0
[ "$DRY_RUN" = 1 ] || [ -n "$PY" ] || { NEED_SETUP=1; PY=.venv/bin/python; PY_SHOWN=$PY; }

SLUG=$(echo "${GPU_NAME:-gpu}" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
DATE=$(date +%Y-%m-%d)
REPORT=bench/results/device-${SLUG:-gpu}-$DATE.md
COMMIT=${OQFL_COMMIT:-}
if [ -z "$COMMIT" ]; then
  if COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null); then
    [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || COMMIT+=" (dirty)"
  else
    COMMIT="unknown (no git metadata; set OQFL_COMMIT)"
  fi
fi
if [ "$DRY_RUN" = 1 ]; then WORK="<work dir>"; else WORK=$(mktemp -d "${TMPDIR:-/tmp}/oqfl-device-check.XXXXXX"); fi
STEPS=$WORK/steps.tsv
FAILED=0

# step NAME LIMIT CMD...: runs CMD under `timeout` (LIMIT seconds, less when the budget is
# nearly spent), its output in $WORK/NAME.log; records name, status, exit code, wall seconds,
# limit and command in $STEPS. Never stops the script; returns CMD's status.
step() {
  local name=$1 limit=$2; shift 2
  local cmd; cmd=$(show "$@")
  if [ "$DRY_RUN" = 1 ]; then
    printf '  [%s] (timeout %ss)\n    %s\n' "$name" "$limit" "$cmd"
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START) - REPORT_RESERVE))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    printf '%s\tnot run (budget spent)\t-\t0\t%s\t%s\n' "$name" "$limit" "$cmd" >>"$STEPS"
    echo "device_check: [$name] not run: the ${BUDGET}s budget is spent" >&2
    FAILED=1
    return 1
  fi
  echo "device_check: [$name] (timeout ${limit}s) $cmd" >&2
  local t0=$SECONDS rc=0 status
  timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" "$cmd" >>"$STEPS"
  echo "device_check: [$name] $status (exit $rc, $((SECONDS - t0))s)" >&2
  if [ "$rc" != 0 ]; then
    FAILED=1
    tail -n 20 "$WORK/$name.log" | sed 's/^/    /' >&2
  fi
  return "$rc"
}

if [ "$DRY_RUN" = 1 ]; then
  echo "device_check plan (dry run: nothing is run)"
  echo "  GPU: ${GPU_NAME:-none detected here}, compute capability $CAP"
  echo "  python: $PY_SHOWN (\$OQFL_PYTHON, else .venv/bin/python or python3, the first whose torch sees the GPU)"
  echo "  budget: ${BUDGET}s for all steps, each under its own timeout; ${REPORT_RESERVE}s kept for the report"
  echo "  steps:"
  PY=$PY_SHOWN
else
  : >"$STEPS"
  echo "device_check: GPU $GPU_NAME (compute capability $CAP); python $PY; work dir $WORK" >&2
fi

# ------------------------------------------------------------------ the steps
if [ "$NEED_SETUP" = 1 ] || [ "$DRY_RUN" = 1 ]; then
  # only when no interpreter has a CUDA torch: makes .venv and builds (arch-only) like `build`
  [ "$DRY_RUN" = 1 ] && echo "  (setup runs only when no interpreter has a CUDA torch)"
  step setup 420 env TORCH_CUDA_ARCH_LIST="$CAP" MAX_JOBS="$NPROC" OQFL_NO_FLOWER=1 \
    bash scripts/setup.sh || true
fi
step probe 60 "$PY" bench/report_device.py probe --out "$WORK/env.json" || true
step build 300 env TORCH_CUDA_ARCH_LIST="$CAP" MAX_JOBS="$NPROC" "$PY" -m pip install \
  --disable-pip-version-check -q --no-build-isolation --no-deps -e . || true
step verify 60 "$PY" bench/report_device.py verify --arch "$CAP" --out "$WORK/build.json" || true
step tests 240 env PYTHONUNBUFFERED=1 "$PY" bench/report_device.py tests \
  --summary "$WORK/tests.json" -- python_tests || true
step bench_fake_quant 180 "$PY" bench/report.py -k cuda --json-out "$WORK/bench_fake_quant.json" || true
step bench_train_step 120 "$PY" bench/report_train_step.py -k cuda \
  --json-out "$WORK/bench_train_step.json" || true

REPORT_CMD=("$PY" bench/report_device.py report --work "$WORK" --out "$REPORT" --commit "$COMMIT"
            --python "$PY" --capability "$CAP" --gpu-name "$GPU_NAME" --date "$DATE")
if [ "$DRY_RUN" = 1 ]; then
  printf '  [report] (timeout %ss)\n    %s\n' "$REPORT_RESERVE" "$(show "${REPORT_CMD[@]}")"
  echo "  then: copy $REPORT, the step logs and the JSON to \$OUT when set"
  echo "  exit: 0 all steps ok; 1 a test or step failed; 2 no NVIDIA GPU"
  exit 0
fi

# the report gets the reserved time whatever the budget did; it needs no torch, so any python
# does where the steps' one cannot start
timeout 10 "$PY" -c pass >/dev/null 2>&1 || REPORT_CMD[0]=python3
rc=0
timeout --kill-after=5 "$REPORT_RESERVE" "${REPORT_CMD[@]}" >"$WORK/report.log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
  FAILED=1
  echo "device_check: writing the report failed (exit $rc):" >&2
  tail -n 20 "$WORK/report.log" | sed 's/^/    /' >&2
fi
LOG=$WORK/device-check-$SLUG-$DATE.log
for f in "$WORK"/*.log; do
  [ "$f" = "$LOG" ] && continue
  printf '===== %s\n' "$(basename "$f")"
  cat "$f"
done >"$LOG"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in "$REPORT" "$LOG" "$WORK"/tests.json "$WORK"/bench_*.json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
fi
[ -f "$REPORT" ] && cat "$REPORT"
echo "device_check: report $REPORT, logs $LOG, total $((SECONDS - START))s" >&2
exit "$FAILED"
