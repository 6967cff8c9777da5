#!/usr/bin/env bash
# Measures what `ebb worker` costs in front of a trivial upstream.
#
#   1. ebb-bench-upstream alone, loaded by ebb-load            (the baseline)
#   2. ebb worker --mode http in front of the same upstream   (same load)
#      + worker RSS idle (after ready, before load) and peak under load
#   3. ebb worker --mode fork -- cat                           (one process per request)
#
# Prints a Markdown table and every command used. Everything listens on
# 127.0.0.1, every run is bounded, and every process started here is stopped
# by pid on exit.
#
# Knobs (environment):
#   CONNECTIONS=32  DURATION=10s  WARMUP=1s  BODY_SIZE=0  METHOD=POST
#   FORK_DURATION=5s  FORK_CONNECTIONS=$CONNECTIONS  MAX_INFLIGHT=1024
#   LOAD_THREADS=   (ebb-load --threads; default: all CPUs)
#   LOAD_CPUS= SERVER_CPUS=   (taskset -c lists, e.g. LOAD_CPUS=0 SERVER_CPUS=1-3)
#   SKIP_BUILD=1    (use existing target/release binaries)
#   EBB=path/to/ebb  OUT_DIR=dir (JSON results and logs; default: a temp dir)
#
# Exit status: 0 all runs done; 1 a run failed; 3 worker runs skipped because
# `ebb worker` is not available.
set -euo pipefail

CONNECTIONS=${CONNECTIONS:-32}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
BODY_SIZE=${BODY_SIZE:-0}
METHOD=${METHOD:-POST}
FORK_DURATION=${FORK_DURATION:-5s}
FORK_CONNECTIONS=${FORK_CONNECTIONS:-$CONNECTIONS}
MAX_INFLIGHT=${MAX_INFLIGHT:-1024}
LOAD_THREADS=${LOAD_THREADS:-}
LOAD_CPUS=${LOAD_CPUS:-}
SERVER_CPUS=${SERVER_CPUS:-}
SKIP_BUILD=${SKIP_BUILD:-0}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-20}
STOP_GRACE_S=${STOP_GRACE_S:-10}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/release
EBB=${EBB:-$bin/ebb}
LOAD=$bin/ebb-load
UPSTREAM=$bin/ebb-bench-upstream
OUT_DIR=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ebb-worker-bench.XXXXXX")}
mkdir -p "$OUT_DIR"

log() { printf '%s\n' "worker-bench: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- processes

declare -a PIDS=()          # direct children started here
declare -A CHILD_CMD=()     # grandchildren (worker handlers): pid -> cmdline seen

cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

# Stops one direct child: SIGTERM, up to STOP_GRACE_S to exit, then SIGKILL.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_GRACE_S * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "pid $pid did not stop within ${STOP_GRACE_S}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Remembers the current children of a worker so they can be stopped if the
# worker leaves them behind.
note_children() {
    local c
    for c in $(ps -o pid= --ppid "$1" 2>/dev/null || true); do
        CHILD_CMD[$c]=$(cmdline_of "$c")
    done
}

# Stops remembered grandchildren that are still alive and still the same
# process (same cmdline, so a reused pid is left alone).
stop_children() {
    local c
    for c in "${!CHILD_CMD[@]}"; do
        if kill -0 "$c" 2>/dev/null && [[ "$(cmdline_of "$c")" == "${CHILD_CMD[$c]}" ]]; then
            log "worker left child $c (${CHILD_CMD[$c]}) running; stopping it"
            kill -TERM "$c" 2>/dev/null || true
            sleep 0.5
            kill -0 "$c" 2>/dev/null && kill -KILL "$c" 2>/dev/null || true
        fi
        unset "CHILD_CMD[$c]"
    done
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    PIDS=()
    stop_children
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in the background (pinned to SERVER_CPUS if set), logging to
# $OUT_DIR/<name>.log; sets START_PID.
start_bg() {
    local name=$1
    shift
    local -a pin=()
    [[ -n $SERVER_CPUS ]] && pin=(taskset -c "$SERVER_CPUS")
    "${pin[@]}" "$@" >"$OUT_DIR/$name.log" 2>&1 &
    START_PID=$!
    PIDS+=("$START_PID")
}

# Stops a process started by start_bg and forgets it.
stop_bg() {
    local pid=$1 p
    stop_pid "$pid"
    local -a keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# ---------------------------------------------------------------- helpers

# A TCP port on 127.0.0.1 that nothing listens on now (and not one of "$@").
free_port() {
    local p i taken
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 40000))
        taken=0
        for x in "$@"; do [[ $p == "$x" ]] && taken=1; done
        ((taken)) && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    die "no free port found"
}

# One GET with ebb-load; succeeds iff the answer is 2xx.
http_ok() {
    "$LOAD" --url "$1" --connections 1 --requests 1 --warmup 0s --timeout 2s \
        --method GET --threads 1 >/dev/null 2>&1
}

# Waits until GET $2 answers 2xx while pid $1 stays alive.
wait_ready() {
    local pid=$1 url=$2 name=$3 i
    for ((i = 0; i < READY_TIMEOUT_S * 10; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$name exited before becoming ready; log $OUT_DIR/$name.log:"
            tail -n 20 "$OUT_DIR/$name.log" >&2 || true
            return 1
        fi
        http_ok "$url" && return 0
        sleep 0.1
    done
    log "$name not ready at $url after ${READY_TIMEOUT_S}s; log $OUT_DIR/$name.log:"
    tail -n 20 "$OUT_DIR/$name.log" >&2 || true
    return 1
}

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# Samples the RSS of pid $1 every 100 ms into file $2 (peak, kB); sets SAMPLER_PID.
start_rss_sampler() {
    local pid=$1 file=$2
    (
        peak=0
        while kill -0 "$pid" 2>/dev/null; do
            r=$(rss_kb "$pid")
            ((r > peak)) && peak=$r && echo "$peak" >"$file"
            sleep 0.1
        done
    ) &
    SAMPLER_PID=$!
    PIDS+=("$SAMPLER_PID")
}

# A top-level number from an ebb-load --json object.
json_num() { sed -nE "s/.*\"$2\":(-?[0-9.eE+]+).*/\1/p" <<<"$1"; }

# Runs ebb-load against $2 for duration $3 with $4 connections; stores the JSON
# in $OUT_DIR/$1.json and echoes it. Fails if no request got a 2xx answer.
run_load() {
    local name=$1 url=$2 duration=$3 conns=$4
    local -a pin=() threads=()
    [[ -n $LOAD_CPUS ]] && pin=(taskset -c "$LOAD_CPUS")
    [[ -n $LOAD_THREADS ]] && threads=(--threads "$LOAD_THREADS")
    local out rc=0
    out=$("${pin[@]}" "$LOAD" --url "$url" --connections "$conns" --duration "$duration" \
        --warmup "$WARMUP" --body-size "$BODY_SIZE" --method "$METHOD" "${threads[@]}" --json) || rc=$?
    printf '%s\n' "$out" >"$OUT_DIR/$name.json"
    if ((rc != 0)); then
        log "$name: ebb-load failed (exit $rc): $out"
        return 1
    fi
    local errors
    errors=$(json_num "$out" errors)
    log "$name: $(json_num "$out" requests_per_sec | xargs printf '%.0f') req/s, p50 $(json_num "$out" p50_us) µs, p99 $(json_num "$out" p99_us) µs, errors $errors"
    ((errors == 0)) || log "$name: WARNING: $errors errors: $(sed -nE 's/.*"error_kinds":(\{[^}]*\}).*/\1/p' <<<"$out")"
    COMMANDS+=("$(sed -nE 's/.*"command":"(([^"\\]|\\.)*)".*/\1/p' <<<"$out" | sed 's/\\"/"/g; s/\\\\/\\/g')")
    LAST_JSON=$out
}

quote_cmd() { local q; printf -v q '%q ' "$@"; printf '%s' "${q% }"; }

declare -a COMMANDS=()
note_cmd() { COMMANDS+=("$(quote_cmd "$@") &"); }

# ---------------------------------------------------------------- build

if [[ $SKIP_BUILD != 1 ]]; then
    log "building release binaries"
    (cd "$root" && cargo build --release -p ebb -p ebb-bench) >&2 || die "cargo build failed"
fi
[[ -x $LOAD && -x $UPSTREAM ]] || die "missing $LOAD or $UPSTREAM (build with: cargo build --release -p ebb-bench)"

have_worker=1
worker_help=$("$EBB" worker --help 2>&1 || true)
if [[ $worker_help != *--upstream* || $worker_help != *--max-inflight* ]]; then
    have_worker=0
    log "WARNING: '$EBB worker --help' does not describe --upstream/--max-inflight: 'ebb worker' is not available; worker runs are skipped"
fi

# ---------------------------------------------------------------- 1. direct

q=$(free_port)
up_cmd=("$UPSTREAM" --listen "127.0.0.1:$q")
note_cmd "${up_cmd[@]}"
start_bg upstream "${up_cmd[@]}"
up_pid=$START_PID
wait_ready "$up_pid" "http://127.0.0.1:$q/" upstream || die "upstream did not start"
run_load direct "http://127.0.0.1:$q/" "$DURATION" "$CONNECTIONS" || die "direct run failed"
DIRECT=$LAST_JSON
stop_bg "$up_pid"

# ---------------------------------------------------------------- 2. worker, http mode

HTTP="" FORK=""
http_idle_kb="" http_peak_kb="" fork_idle_kb="" fork_peak_kb=""

# Runs one worker configuration: name, duration, connections, then the worker
# command. Sets RUN_JSON, IDLE_KB, PEAK_KB.
bench_worker() {
    local name=$1 duration=$2 conns=$3 port=$4
    shift 4
    note_cmd "$@"
    start_bg "$name" "$@"
    local wpid=$START_PID
    wait_ready "$wpid" "http://127.0.0.1:$port/_/ready" "$name" || return 1
    note_children "$wpid"
    sleep 0.5 # let start-up allocations settle before sampling idle RSS
    IDLE_KB=$(rss_kb "$wpid")
    local peak_file="$OUT_DIR/$name.rss-peak"
    echo "$IDLE_KB" >"$peak_file"
    start_rss_sampler "$wpid" "$peak_file"
    local sampler=$SAMPLER_PID rc=0
    local cpu0
    cpu0=$(cpu_ticks "$wpid")
    run_load "$name" "http://127.0.0.1:$port/" "$duration" "$conns" || rc=$?
    # CPU the worker process itself spent per answered request (warm-up included
    # in the ticks but not in the count, so this slightly overstates it).
    CPU_US=$(awk -v t="$(($(cpu_ticks "$wpid") - cpu0))" -v hz="$(getconf CLK_TCK)" \
        -v n="$(json_num "${LAST_JSON:-}" ok)" 'BEGIN { if (n > 0) printf "%.1f", t / hz * 1e6 / n; else print "n/a" }')
    note_children "$wpid"
    stop_bg "$sampler"
    PEAK_KB=$(cat "$peak_file")
    RUN_JSON=${LAST_JSON:-}
    stop_bg "$wpid"
    stop_children
    return "$rc"
}

if ((have_worker)); then
    p=$(free_port)
    q=$(free_port "$p")
    LAST_JSON=""
    bench_worker worker-http "$DURATION" "$CONNECTIONS" "$p" \
        "$EBB" worker --listen "127.0.0.1:$p" --mode http --upstream "http://127.0.0.1:$q" \
        --max-inflight "$MAX_INFLIGHT" -- "$UPSTREAM" --listen "127.0.0.1:$q" ||
        die "worker http run failed"
    HTTP=$RUN_JSON http_idle_kb=$IDLE_KB http_peak_kb=$PEAK_KB http_cpu_us=$CPU_US

    # ------------------------------------------------------------ 3. worker, fork mode
    p=$(free_port)
    LAST_JSON=""
    bench_worker worker-fork "$FORK_DURATION" "$FORK_CONNECTIONS" "$p" \
        "$EBB" worker --listen "127.0.0.1:$p" --mode fork --max-inflight "$MAX_INFLIGHT" -- cat ||
        die "worker fork run failed"
    FORK=$RUN_JSON fork_idle_kb=$IDLE_KB fork_peak_kb=$PEAK_KB fork_cpu_us=$CPU_US
fi

# ---------------------------------------------------------------- report

mib() { [[ -n $1 ]] && awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }' || echo "n/a"; }
row() {
    local label=$1 j=$2 conns=$3
    if [[ -z $j ]]; then
        printf '| %s | %s | n/a | n/a | n/a | n/a | n/a | n/a |\n' "$label" "$conns"
        return
    fi
    printf '| %s | %s | %.0f | %s | %s | %s | %s | %s |\n' "$label" "$conns" \
        "$(json_num "$j" requests_per_sec)" "$(json_num "$j" p50_us)" "$(json_num "$j" p90_us)" \
        "$(json_num "$j" p99_us)" "$(json_num "$j" max_us)" "$(json_num "$j" errors)"
}
delta() { awk -v a="$1" -v b="$2" 'BEGIN { d = b - a; printf "%+d µs", d }'; }

echo
echo "## ebb worker benchmark"
echo
echo "$(nproc) CPUs, $(uname -sr), git $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo none)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (dirty)'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "load: $METHOD, body $BODY_SIZE B, warmup $WARMUP, ${LOAD_CPUS:+load on CPUs $LOAD_CPUS, }${SERVER_CPUS:+servers on CPUs $SERVER_CPUS, }--max-inflight $MAX_INFLIGHT; throughput and latency over 2xx responses"
echo
echo "| run | conns | req/s | p50 µs | p90 µs | p99 µs | max µs | errors |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
row "upstream direct ($DURATION)" "$DIRECT" "$CONNECTIONS"
row "ebb worker --mode http ($DURATION)" "$HTTP" "$CONNECTIONS"
row "ebb worker --mode fork -- cat ($FORK_DURATION)" "$FORK" "$FORK_CONNECTIONS"
echo
echo "| worker overhead (http mode) | value |"
echo "|---|---:|"
if [[ -n $HTTP ]]; then
    d_rps=$(json_num "$DIRECT" requests_per_sec) w_rps=$(json_num "$HTTP" requests_per_sec)
    echo "| throughput, worker / direct | $(awk -v w="$w_rps" -v d="$d_rps" 'BEGIN { printf "%.2f", (d > 0 ? w / d : 0) }') |"
    echo "| added p50 latency | $(delta "$(json_num "$DIRECT" p50_us)" "$(json_num "$HTTP" p50_us)") |"
    echo "| added p99 latency | $(delta "$(json_num "$DIRECT" p99_us)" "$(json_num "$HTTP" p99_us)") |"
fi
echo "| worker CPU per request, http mode | ${http_cpu_us:-n/a} µs |"
echo "| worker CPU per request, fork mode (without the children) | ${fork_cpu_us:-n/a} µs |"
echo "| worker RSS idle, http mode | $(mib "$http_idle_kb") |"
echo "| worker RSS peak under load, http mode | $(mib "$http_peak_kb") |"
echo "| worker RSS idle, fork mode | $(mib "$fork_idle_kb") |"
echo "| worker RSS peak under load, fork mode | $(mib "$fork_peak_kb") |"
echo
echo "Commands (servers first, then the load for each run; results in $OUT_DIR):"
echo
echo '```sh'
printf '%s\n' "${COMMANDS[@]}"
echo '```'

if ((!have_worker)); then
    log "worker runs were skipped: 'ebb worker' is not available"
    exit 3
fi
