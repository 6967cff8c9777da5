#!/bin/sh
# Publishes one event to each example function of examples/stack.yaml.
# Usage: examples/publish.sh [DEV_URL]   (default http://127.0.0.1:8080)
set -e
url=${1:-http://127.0.0.1:8080}
ebb=${EBB:-ebb}
command -v "$ebb" >/dev/null 2>&1 || ebb="cargo run --quiet --release --"
$ebb publish --dev "$url" hello 'hello, ebb'
$ebb publish --dev "$url" -H content-type:application/json greet '{"name": "Ada"}'
$ebb publish --dev "$url" orders 'order 1'
$ebb publish --dev "$url" orders 'order 2 (flaky)'
$ebb publish --dev "$url" orders 'order 3 (poison)'
$ebb publish --dev "$url" jobs 'job 1'
