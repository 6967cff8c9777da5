#!/usr/bin/env bash
# Benchmark: NATS JetStream -> ebb connector nats -> HTTP function.
#
#   bench/nats-bench.sh                 # 100 000 messages of 1 KiB
#   COUNT=20000 SIZE=256 bench/nats-bench.sh
#
# 1. The connector starts (creating its durable consumer) and stops; COUNT
#    messages are published to the stream while it is down.
# 2. The connector starts again and works the backlog off; the run ends when
#    the consumer has nothing pending or unacked. Reported: messages/s
#    delivered and acked, the connector's CPU time per message, its RSS idle
#    and its peak RSS under load.
# 3. Core mode: the connector subscribes with a queue group and COUNT messages
#    are published as fast as possible; reported: delivered/s and how many
#    were delivered (core NATS is at-most-once: a slow consumer loses some).
#
# The function is ebb-bench-upstream (answers 200 at once). Everything runs on
# 127.0.0.1 and is stopped by pid on exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
COUNT=${COUNT:-100000}
SIZE=${SIZE:-1024}
MAX_INFLIGHT=${MAX_INFLIGHT:-256}
NATS_SERVER=${NATS_SERVER:-$root/.venv/bin/nats-server}
[[ -x $NATS_SERVER ]] || NATS_SERVER=$(command -v nats-server) || { echo "nats-server not found: run scripts/install-test-deps" >&2; exit 1; }
R=$root/target/release
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    (cd "$root" && cargo build --release -p ebb -p ebb-bench) >&2
fi

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
wait_http() { for _ in $(seq 1 200); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "timeout waiting for $1" >&2; return 1; }
log() { echo "nats-bench: $*" >&2; }

np=$(free_port); sp=$(free_port); ap=$(free_port)
nats_url="nats://127.0.0.1:$np"
"$NATS_SERVER" -js -a 127.0.0.1 -p "$np" -sd "$dir/js" >"$dir/nats.log" 2>&1 &
pids+=($!)
"$R/ebb-bench-upstream" --listen "127.0.0.1:$sp" --fixed >"$dir/sink.log" 2>&1 &
pids+=($!)
wait_http "http://127.0.0.1:$sp/"
cat >"$dir/stack.yaml" <<YAML
functions:
  - name: bench
    url: http://127.0.0.1:$sp
    topics: [bench.msgs]
    max-inflight: $MAX_INFLIGHT
YAML

start_connector() {
    "$R/ebb" connector nats --functions "$dir/stack.yaml" --url "$nats_url" \
        --admin-addr "127.0.0.1:$ap" "$@" >>"$dir/connector.log" 2>&1 &
    CONN=$!
    pids+=("$CONN")
    wait_http "http://127.0.0.1:$ap/_/ready"
}
stop_connector() { kill -TERM "$CONN"; wait "$CONN" || true; }

# 1. consumer exists, connector down, backlog published
start_connector
sleep 1
idle_kb=$(rss_kb "$CONN")
stop_connector
log "publishing $COUNT messages of $SIZE B"
pub=$("$R/ebb-nats-load" --url "$nats_url" publish --subject bench.msgs --count "$COUNT" --size "$SIZE")
log "published: $pub"

# 2. drain the backlog
start_connector
cpu0=$(cpu_ticks "$CONN")
if [[ -n ${PERF_OUT:-} ]]; then perf record -F 999 -g -p "$CONN" -o "$PERF_OUT" >/dev/null 2>&1 & pids+=($!); fi
peak_kb=$(rss_kb "$CONN")
( while kill -0 "$CONN" 2>/dev/null; do k=$(rss_kb "$CONN"); ((k > peak_kb)) && peak_kb=$k && echo "$k" >"$dir/peak"; sleep 0.1; done ) &
sampler=$!
drained=$("$R/ebb-nats-load" --url "$nats_url" drained --consumer ebb-default-bench --count "$COUNT")
cpu1=$(cpu_ticks "$CONN")
kill "$sampler" 2>/dev/null || true
[[ -f $dir/peak ]] && peak_kb=$(cat "$dir/peak")
delivered=$(curl -fs "http://127.0.0.1:$ap/metrics" | awk '/^ebb_deliveries_total\{function="default\/bench",outcome="delivered"\}/ { print $2 }')
stop_connector
hz=$(getconf CLK_TCK)
js_rate=$(sed -nE 's/.*"per_sec":([0-9]+).*/\1/p' <<<"$drained")
js_secs=$(sed -nE 's/.*"secs":([0-9.]+).*/\1/p' <<<"$drained")
cpu_us=$(awk -v t="$((cpu1 - cpu0))" -v hz="$hz" -v n="$COUNT" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')

# 3. core mode
start_connector --mode core
sleep 0.5
before=0
core_pub=$("$R/ebb-nats-load" --url "$nats_url" publish --subject bench.msgs --count "$COUNT" --size "$SIZE" --core)
core_start=$(date +%s.%N)
last=-1; same=0
while :; do
    n=$(curl -fs "http://127.0.0.1:$ap/metrics" | awk '/^ebb_deliveries_total\{function="default\/bench",outcome="delivered"\}/ { print $2 }')
    n=${n:-0}
    if [[ $n == "$last" ]]; then same=$((same + 1)); else same=0; last=$n; last_change=$(date +%s.%N); fi
    ((n >= COUNT || same >= 20)) && break
    sleep 0.05
done
core_secs=$(awk -v a="$core_start" -v b="${last_change:-$core_start}" -v p="$(sed -nE 's/.*"secs":([0-9.]+).*/\1/p' <<<"$core_pub")" 'BEGIN { printf "%.3f", b - a + p }')
core_rate=$(awk -v n="$last" -v s="$core_secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
stop_connector

echo
echo "## NATS connector benchmark"
echo
echo "$(nproc) CPUs, $(uname -sr), $("$NATS_SERVER" --version), git $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo none), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "$COUNT messages of $SIZE B, function max-inflight $MAX_INFLIGHT, sink answers 200 at once"
echo
echo "| figure | value |"
echo "|---|---:|"
echo "| JetStream: delivered and acked | $js_rate msg/s ($COUNT in ${js_secs}s; metric says ${delivered:-?} delivered) |"
echo "| JetStream: connector CPU per message | $cpu_us µs |"
echo "| connector RSS idle | $(awk -v k="$idle_kb" 'BEGIN { printf "%.1f MiB", k / 1024 }') |"
echo "| connector RSS peak under load | $(awk -v k="$peak_kb" 'BEGIN { printf "%.1f MiB", k / 1024 }') |"
echo "| core NATS: delivered | $last of $COUNT in ${core_secs}s ($core_rate msg/s) |"
echo
echo "Publisher: $pub"
echo "Rerun: COUNT=$COUNT SIZE=$SIZE MAX_INFLIGHT=$MAX_INFLIGHT bench/nats-bench.sh"
