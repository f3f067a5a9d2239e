#!/usr/bin/env bash
# The one-shot GPU run: tests on CUDA, the op / encoder / training benchmarks, and the measured backend order.
#
#   benchmarks/gpu_suite.sh               on a GPU machine with torch and triton installed (no internet needed)
#   benchmarks/gpu_suite.sh --cpu         the CPU's own results: CPU defaults, plus ViT-B at batch 4 (minutes)
#   benchmarks/gpu_suite.sh --cpu-quick   the GPU run's code paths on the CPU with tiny shapes (FASTMAE_SUITE_CPU_QUICK=1)
#                                         (its gpu-tests part runs the sharded test runner on a few CPU tests)
#
# Parts: warm (the benchmarks' Triton kernels compiled in parallel, beside the tests), gpu-tests, bench-ops,
# priority, bench-attention, encoder-vit-b/l, train-vit-b/l, train-compile-vit-b, tune-loss and tune (in the time
# left).
# Run it from anywhere; it works in the repository root. It installs fastmae without dependencies (an editable pip
# install; if pip cannot, this checkout on PYTHONPATH with fastmae/kernels linked to kernels/ for the run),
# installs any wheels carried in .whl/ (xformers, pytest, ...) into a folder of the run's own on PYTHONPATH (the
# environment itself may not be writable; the folder goes when the script ends), then runs each part under its own
# timeout. A failing part does not stop the others. Everything goes to benchmarks/results/<device>/<date>/
# (results.json, results.csv, plots, priority.json, logs/, summary.md); summary.md lists every part as ok / failed
# (exit code) / skipped (reason) with its time. If the environment variable OUT is set, summary.md, results.json
# and a tarball of the run folder are also copied there (flat, three files), and refreshed after every part, so a
# run stopped from outside still leaves what it measured there.
#
# Environment: PYTHON (default: .venv/bin/python if `make` built it, else python3),
# FASTMAE_RESULTS_ROOT (default benchmarks/results), FASTMAE_SUITE_WHEELS (the folder of wheels to install:
# .whl on the GPU, none in the CPU modes unless set), FASTMAE_COMMIT (the commit the records name, where set: for a
# checkout that travelled as a copy, with no .git folder or a stale one),
# FASTMAE_SUITE_BUDGET_S (the whole run's time budget: 530 s on the GPU, under 9 minutes with set-up and summary),
# FASTMAE_SUITE_PARTS (a comma-separated list of parts to run, e.g. bench-ops,encoder-vit-b: the others are
# recorded as skipped, not selected; the set-up, wheels and install, always runs).
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)

MODE=gpu
for arg in "$@"; do
    case "$arg" in
        --cpu-quick) MODE=cpu-quick ;;
        --cpu) MODE=cpu ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
if [ "${FASTMAE_SUITE_CPU_QUICK:-0}" = "1" ]; then MODE=cpu-quick; fi
PARTS="warm gpu-tests bench-ops priority bench-attention encoder-vit-b encoder-vit-l train-vit-b train-vit-l \
train-compile-vit-b encoder-cpu-default train-cpu-default tune-loss tune"
SELECTED=${FASTMAE_SUITE_PARTS:-}
for p in ${SELECTED//,/ }; do
    case " $PARTS " in
        *" $p "*) ;;
        *) echo "gpu_suite.sh: FASTMAE_SUITE_PARTS names an unknown part $p (parts: $PARTS)" >&2; exit 2 ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python  # the environment `make` builds
else PY=$(command -v python3 || command -v python); fi
case "$MODE" in
    gpu) DEVICE=cuda; Q="--device cuda"; DEFAULT_BUDGET=530; OPS_LIMIT=75 ;;
    cpu) DEVICE=cpu; Q="--device cpu"; DEFAULT_BUDGET=1200; OPS_LIMIT=180 ;;
    cpu-quick) DEVICE=cpu; Q="--quick --device cpu"; DEFAULT_BUDGET=300; OPS_LIMIT=75 ;;
esac
BUDGET=${FASTMAE_SUITE_BUDGET_S:-$DEFAULT_BUDGET}
START=$(date +%s)
export FASTMAE_SUITE_RUNNING=1  # tests that would start this suite again skip themselves
export PYTHONUNBUFFERED=1

PARTS_TMP=$(mktemp)
LOG_TMP=$(mktemp -d)
RUN_DIR=""

log() { echo "[gpu_suite $(( $(date +%s) - START ))s] $*"; }

record() {  # name status rc seconds note command
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >> "$PARTS_TMP"
    log "$1: $2${5:+ ($5)} in ${4}s"
    copy_out
}

copy_out() {  # with OUT set: the run folder as it is now (results.json, parts.tsv, logs) to $OUT, after every
    # part, so that a run stopped from outside still hands back what it measured
    if [ -z "${OUT:-}" ] || [ -z "$RUN_DIR" ] || [ ! -d "$RUN_DIR" ]; then return; fi
    mkdir -p "$OUT"
    cat "$PARTS_TMP" > "$RUN_DIR/parts.tsv"
    local tarball="$OUT/results-$SLUG-$DATE.tar.gz"  # whole or not at all: written aside, then renamed
    tar -czf "$tarball.part" -C "$RESULTS_ROOT" "$SLUG/$DATE" 2>/dev/null && mv -f "$tarball.part" "$tarball"
    rm -f "$tarball.part"
    [ -f "$RUN_DIR/summary.md" ] && cp "$RUN_DIR/summary.md" "$OUT/"
    [ -f "$RUN_DIR/results.json" ] && cp "$RUN_DIR/results.json" "$OUT/"
}

skip() {  # name reason
    record "$1" skipped "" 0 "$2" ""
}

part_limit() {  # name timeout_s [least_s]: LIMIT = the timeout cut to what is left of the suite's budget; with
    # less than least_s (default 15) left, or a part FASTMAE_SUITE_PARTS leaves out, the part is recorded as
    # skipped and the status is 1
    if [ -n "$SELECTED" ] && [[ " $PARTS " == *" $1 "* ]] && [[ ",$SELECTED," != *",$1,"* ]]; then
        skip "$1" "not selected (FASTMAE_SUITE_PARTS=$SELECTED)"
        return 1
    fi
    local left=$(( BUDGET - ($(date +%s) - START) - 10 )) least=${3:-15}
    if [ "$left" -lt "$least" ]; then
        skip "$1" "out of the suite's time budget (${BUDGET}s): needs ${least}s, ${left}s left"
        return 1
    fi
    LIMIT=$2
    if [ "$LIMIT" -gt "$left" ]; then LIMIT=$left; fi
}

run_part() {  # name timeout_s command...
    local name=$1
    part_limit "$1" "$2" || return
    local limit=$LIMIT
    shift 2
    local logdir=${RUN_DIR:+$RUN_DIR/logs}
    logdir=${logdir:-$LOG_TMP}
    mkdir -p "$logdir"
    log "$name: starting (timeout ${limit}s): $*"
    local t0=$(date +%s) rc=0
    start_part "$limit" "$logdir/$name.log" "$@"
    FG_PID=$PART_PID
    wait "$FG_PID" || rc=$?
    FG_PID=""
    finish_part "$name" "$rc" "$(( $(date +%s) - t0 ))" "$logdir/$name.log" "" "$*"
}

finish_part() {  # name rc seconds logfile note-when-ok command
    local name=$1 rc=$2 dt=$3 logfile=$4
    if [ "$rc" -eq 0 ]; then
        record "$name" ok 0 "$dt" "$5" "$6"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        record "$name" timeout "$rc" "$dt" "" "$6"
    else
        record "$name" failed "$rc" "$dt" "$(tail -n 1 "$logfile" | tr '\t' ' ' | cut -c1-160)" "$6"
    fi
    tail -n 25 "$logfile" | sed 's/^/    /'
}

# A part runs under timeout in the background and the script waits for it: a TERM or INT to the script then
# runs its trap at once (bash defers traps until a foreground command ends, and timeout's own process group does
# not get a terminal's Ctrl-C). PART_PID is timeout's pid: a TERM to it reaches the whole part.
FG_PID="" BG_PID=""
start_part() {  # timeout_s logfile command...
    local limit=$1 logfile=$2
    shift 2
    timeout --kill-after=10 "$limit" "$@" > "$logfile" 2>&1 &
    PART_PID=$!
}

bg_start() {  # name timeout_s command...: a part that runs beside the next ones; bg_wait records it
    local name=$1
    part_limit "$1" "$2" || return
    local limit=$LIMIT
    shift 2
    log "$name: starting in the background (timeout ${limit}s): $*"
    BG_NAME=$name BG_CMD="$*" BG_T0=$(date +%s) BG_LOG="$RUN_DIR/logs/$name.log"
    start_part "$limit" "$BG_LOG" "$@"
    BG_PID=$PART_PID
}
# stopped from outside: stop the running parts too (timeout passes the signal on to its command)
trap 'for p in $FG_PID $BG_PID; do kill -TERM "$p" 2>/dev/null; done; exit 143' TERM INT
CLEANUP=()  # paths the run made outside its results (the wheels' folder, the kernels link): gone at the end
trap 'if [ ${#CLEANUP[@]} -gt 0 ]; then rm -rf "${CLEANUP[@]}"; fi' EXIT

bg_wait() {  # note-pattern: the log line quoted in the summary when the part succeeds
    if [ -z "$BG_PID" ]; then return; fi
    local rc=0
    wait "$BG_PID" || rc=$?
    BG_PID=""
    finish_part "$BG_NAME" "$rc" "$(( $(date +%s) - BG_T0 ))" "$BG_LOG" \
        "$(grep -m1 -e "$1" "$BG_LOG" 2>/dev/null | tr '\t' ' ' | cut -c1-160)" "$BG_CMD"
}

# ---------------------------------------------------------------------------------------------- set-up
# Triton compiles into ~/.triton/cache; where that cannot be written (no home folder for this user), into a
# folder of the run's own, which every part shares (the warm-up fills it for the benchmarks)
HOME_CACHE=${HOME:+$HOME/.triton/cache}
if [ -z "${TRITON_CACHE_DIR:-}" ] && ! { [ -n "$HOME_CACHE" ] && mkdir -p "$HOME_CACHE" 2>/dev/null \
        && [ -w "$HOME_CACHE" ]; }; then
    TRITON_CACHE_DIR=$(mktemp -d)
    export TRITON_CACHE_DIR
    CLEANUP+=("$TRITON_CACHE_DIR")
    log "Triton's cache: $TRITON_CACHE_DIR (~/.triton/cache cannot be written)"
fi
WHEELS=${FASTMAE_SUITE_WHEELS:-}
if [ -z "$WHEELS" ] && [ "$MODE" = gpu ]; then WHEELS=.whl; fi
if [ -z "$WHEELS" ]; then
    skip wheels "$MODE mode installs nothing (FASTMAE_SUITE_WHEELS names a folder of wheels to install)"
elif ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    CLEANUP+=("$SITE")
    run_part wheels 120 "$PY" -m pip install --no-deps --no-index --no-compile --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    skip wheels "no wheels in $WHEELS/ to install"
fi

# one interpreter start checks torch, fastmae and fastmae.kernels and the device, and names the device's folder
slug() { "$PY" -m fastmae.bench.suite slug --device "$DEVICE" --import-check 2>>"$LOG_TMP/setup.log"; }
if SLUG=$(slug); then
    skip install "fastmae and fastmae.kernels already import"
elif ! "$PY" -c "import torch" 2>/dev/null; then
    echo "gpu_suite.sh: $PY cannot import torch; set PYTHON to the interpreter that has torch and triton" >&2
    exit 1
elif [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite.sh: torch sees no CUDA device; use --cpu or --cpu-quick on a machine without a GPU" >&2
    exit 1
elif [ "$MODE" != gpu ]; then
    echo "gpu_suite.sh: fastmae does not import ($MODE mode installs nothing):" >&2
    cat "$LOG_TMP/setup.log" >&2
    exit 1
else
    # no index (a GPU machine may have no network: pip would retry for seconds); where setuptools' develop
    # command calls pip again with build isolation, that fails at once and the fallback below takes over
    run_part install 120 env PIP_NO_INDEX=1 "$PY" -m pip install --no-deps --no-build-isolation -e .
    if ! SLUG=$(slug); then
        # pip could not install: import fastmae from this checkout, with fastmae/kernels a link to kernels/ for
        # the run (every part runs here, where `python -m` and pytest put this folder first on the path, so a
        # copy elsewhere on PYTHONPATH would lose to ./fastmae); the link goes when the script ends
        if [ ! -e fastmae/kernels ] && ln -s ../kernels fastmae/kernels; then
            CLEANUP+=("$REPO/fastmae/kernels")  # the link only (rm does not follow it)
        fi
        export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
        if SLUG=$(slug); then
            record install-fallback ok 0 0 "fastmae imported from the checkout, fastmae/kernels linked to kernels/" ""
        else
            record install-fallback failed 1 0 "fastmae.kernels does not import; see logs/setup.log" ""
            SLUG=unknown-device
        fi
    fi
fi

DATE=$(date -u +%Y-%m-%d-%H%M%S)
RESULTS_ROOT=${FASTMAE_RESULTS_ROOT:-benchmarks/results}
RUN_DIR="$RESULTS_ROOT/$SLUG/$DATE"
mkdir -p "$RUN_DIR/logs"
cp "$LOG_TMP"/*.log "$RUN_DIR/logs/" 2>/dev/null
log "results go to $RUN_DIR ($MODE)"

# ---------------------------------------------------------------------------------------------- parts
BENCH=("$PY" -m fastmae bench)
# the training step's variants (fastmae.bench.train_bench.VARIANTS) in two GPU parts: eager, and torch.compile
# with the eager pair they are compared with (tests/bench/test_gpu_suite_quick.py checks they cover them all)
TRAIN_EAGER=fastmae,official-eager,reference+sdpa,fastmae+sdpa,fastmae+lean,fastmae+cudagraph
# ViT-B's eager part also times fastmae with autocast's own per-weight casts (what grouping them saves) and with
# Triton's own launch path for every kernel (what keeping each specialisation's compiled kernel saves)
TRAIN_EAGER_B=$TRAIN_EAGER,fastmae+plain-casts,fastmae+triton-launch
TRAIN_COMPILE=fastmae,official-eager,reference+compile,fastmae+compile,fastmae+compile+cudagraph

# The tuners in whatever time the other parts left, last: the masked-MSE loss's first (the op furthest from its
# bandwidth target; up to 90 s, at least 45 s: 85 candidates of two small kernels at ViT-B/L's patches), then the
# attention's (all that is left, at least 90 s). Each records its
# winners in the run folder (loss_tuned.json and attention_tuned.json, every measurement in tune_loss.json and
# tune.json), not in the kernels' own files, so the parts above measured the launch rules as they are; copy a file to
# kernels/ after reading it.
tune_part() {  # part timeout_s least_s table_file tune-args...
    local part=$1 timeout=$2 least=$3 table=$4
    shift 4
    part_limit "$part" "$timeout" "$least" || return 0
    local limit=$LIMIT interp=() problem
    if [ "$MODE" != gpu ]; then  # code paths only, under the interpreter, if it runs with these packages
        problem=$("$PY" -c "from fastmae.kernels.utils import interpreter_problem as p; print(p() or '')" 2>&1)
        if [ -n "$problem" ]; then
            skip "$part" "$problem"
            return
        fi
        interp=(env TRITON_INTERPRET=1)
    fi
    run_part "$part" "$limit" "${interp[@]}" "${BENCH[@]}" tune --no-progress "$@" \
        --write "$RUN_DIR/$table" --out "$RUN_DIR"
}
if [ "$SLUG" = unknown-device ]; then
    for p in warm gpu-tests bench-ops priority bench-attention encoder-vit-b encoder-vit-l train-vit-b train-vit-l \
             train-compile-vit-b tune-loss tune; do
        skip "$p" "fastmae could not be installed"
    done
else
    # Triton compiles each kernel specialisation on its first launch, one at a time: the benchmarks' ones are
    # compiled first, in parallel, into Triton's cache (fastmae.bench.warm), beside the 8 test shards on the GPU
    WARM=(env -u TRITON_INTERPRET "$PY" -m fastmae.bench.warm)
    case "$MODE" in
    gpu) bg_start warm 200 "${WARM[@]}" --workers 6 --timeout 150 --json "$RUN_DIR/warm.json" ;;
    cpu-quick) bg_start warm 90 "${WARM[@]}" --arch 90 --quick --workers 2 --timeout 60 --json "$RUN_DIR/warm.json" ;;
    *) skip warm "the CPU runs Triton kernels only under its interpreter: nothing to compile" ;;
    esac

    # The CUDA tests in parallel shards (a cold run mostly compiles Triton kernels, one at a time per process);
    # one verbose log per shard in logs/, so a timeout still shows what passed.
    TESTS=("$PY" -m fastmae.bench.suite tests --logs "$RUN_DIR/logs" --)
    if ! "$PY" -c "import pytest" 2>/dev/null; then
        skip gpu-tests "pytest is not installed (carry its wheel in .whl/)"
    elif [ "$MODE" = gpu ]; then
        # the tests that run on CUDA (marked `cuda` at collection); their CPU cases are what CI runs anyway, and
        # on the H200 they took 90 of the part's 126 s
        run_part gpu-tests 150 "${TESTS[@]}" tests -m "cuda and not slow"
    elif [ "$MODE" = cpu-quick ]; then
        # the same runner on a few CPU tests; the CUDA suite itself needs a GPU (the CPU suite is make test)
        run_part gpu-tests 60 "${TESTS[@]}" tests/ops/test_registry.py -k "priority or precedence"
    else
        skip gpu-tests "the GPU test suite runs on CUDA only ($MODE mode; the CPU suite is make test)"
    fi

    bg_wait "launches warmed"  # the kernels compiled before the benchmarks time anything
    run_part bench-ops "$OPS_LIMIT" "${BENCH[@]}" ops $Q --no-progress --out "$RUN_DIR"
    if [ -f "$RUN_DIR/results.json" ]; then
        run_part priority 20 "${BENCH[@]}" ops --rank-from "$RUN_DIR/results.json" \
            --write-priority "$RUN_DIR/priority.json"
    elif part_limit priority 20; then  # (a part left out is recorded as not selected)
        skip priority "bench-ops recorded no results to rank"
    fi

    case "$MODE" in
    gpu) ATTENTION_ARGS=(--batches 64,256 --max-time 0.05) ;;  # two MAE batches (time), every long case
    *) ATTENTION_ARGS=() ;;
    esac
    run_part bench-attention 60 "${BENCH[@]}" attention $Q --no-progress "${ATTENTION_ARGS[@]}" --out "$RUN_DIR"

    case "$MODE" in
    gpu)
        run_part encoder-vit-b 60 "${BENCH[@]}" encoder $Q --no-progress --model mae_vit_base_patch16 --batch 64 \
            --dtype bfloat16 --cuda-graphs --out "$RUN_DIR"
        run_part encoder-vit-l 60 "${BENCH[@]}" encoder $Q --no-progress --model mae_vit_large_patch16 --batch 64 \
            --dtype bfloat16 --cuda-graphs --out "$RUN_DIR"
        # the eager variants of both models first; the torch.compile ones (a cold Inductor build of the forward
        # and backward each, the longest work here) in a part of their own afterwards, with the eager pair they
        # are compared with timed again in the same run; what is left over goes to the tuner
        # (--profile: where each step's GPU time goes, and whether the GPU or the host bounds it)
        run_part train-vit-b 90 "${BENCH[@]}" train $Q --no-progress --profile --model mae_vit_base_patch16 \
            --batch 64 --dtype bfloat16 --variants "$TRAIN_EAGER_B" --out "$RUN_DIR"
        run_part train-vit-l 90 "${BENCH[@]}" train $Q --no-progress --profile --model mae_vit_large_patch16 \
            --batch 64 --dtype bfloat16 --variants "$TRAIN_EAGER" --out "$RUN_DIR"
        run_part train-compile-vit-b 180 "${BENCH[@]}" train $Q --no-progress --model mae_vit_base_patch16 \
            --batch 64 --dtype bfloat16 --variants "$TRAIN_COMPILE" --out "$RUN_DIR"
        tune_part tune-loss 90 45 loss_tuned.json --op loss --shapes loss-B
        tune_part tune "$BUDGET" 90 attention_tuned.json --shapes enc-B,enc-H,dec-16
        ;;
    cpu)
        run_part encoder-cpu-default 120 "${BENCH[@]}" encoder $Q --no-progress --out "$RUN_DIR"
        run_part train-cpu-default 120 "${BENCH[@]}" train $Q --no-progress --profile --out "$RUN_DIR"
        run_part encoder-vit-b 420 "${BENCH[@]}" encoder $Q --no-progress --model mae_vit_base_patch16 --batch 4 \
            --backends reference,sdpa,auto --out "$RUN_DIR"
        skip encoder-vit-l "ViT-L takes minutes per ratio on a small CPU; its shapes are GPU work"
        run_part train-vit-b 300 "${BENCH[@]}" train $Q --no-progress --profile --model mae_vit_base_patch16 \
            --batch 4 --out "$RUN_DIR"
        skip train-vit-l "ViT-L takes minutes per step on a small CPU; its shapes are GPU work"
        skip train-compile-vit-b "train-vit-b runs every variant here (torch.compile ones when asked: --compile)"
        skip tune-loss "tuning times Triton kernels on a GPU (cpu-quick mode checks its code paths)"
        skip tune "tuning times Triton kernels on a GPU (cpu-quick mode checks its code paths)"
        ;;
    cpu-quick)
        run_part encoder-vit-b 60 "${BENCH[@]}" encoder $Q --no-progress --cuda-graphs --out "$RUN_DIR"
        skip encoder-vit-l "cpu-quick mode runs one tiny preset (the ViT-L part differs from ViT-B only in shapes)"
        run_part train-vit-b 60 "${BENCH[@]}" train $Q --no-progress --profile --out "$RUN_DIR"
        skip train-vit-l "cpu-quick mode runs one tiny preset (the ViT-L part differs from ViT-B only in shapes)"
        skip train-compile-vit-b "cpu-quick mode runs every variant in train-vit-b (the CPU's default skips compiling)"
        tune_part tune-loss 60 15 loss_tuned.json --op loss --quick --allow-interpreter --device cpu
        tune_part tune "$BUDGET" 90 attention_tuned.json --quick --allow-interpreter --device cpu
        ;;
    esac
fi

# ---------------------------------------------------------------------------------------------- summary
cat "$PARTS_TMP" > "$RUN_DIR/parts.tsv"
# the logs name files relative to the checkout, not by the machine's own path to it (pytest's rootdir, tracebacks)
for f in "$RUN_DIR"/logs/*.log; do [ -f "$f" ] && sed -i "s#$REPO/#./#g; s#$REPO#.#g" "$f"; done
if ! "$PY" -m fastmae.bench.suite summary --parts "$RUN_DIR/parts.tsv" --results "$RUN_DIR" --mode "$MODE" \
        > "$RUN_DIR/logs/summary.log" 2>&1; then
    {   # the plain fallback: the part table alone
        echo "# fastmae benchmark suite ($MODE)"
        echo
        echo "(summary.md written by the shell: python -m fastmae.bench.suite failed; see logs/summary.log)"
        echo
        echo "| part | status | exit code | seconds | note |"
        echo "| --- | --- | --- | --- | --- |"
        awk -F'\t' '{printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5}' "$RUN_DIR/parts.tsv"
    } > "$RUN_DIR/summary.md"
fi
if [ -n "${OUT:-}" ]; then
    copy_out
    log "copied summary.md, results.json and results-$SLUG-$DATE.tar.gz to \$OUT"
fi
rm -f "$PARTS_TMP"
rm -rf "$LOG_TMP"
cat "$RUN_DIR/summary.md"
log "done in $(( $(date +%s) - START ))s: $RUN_DIR"
exit 0
