#!/usr/bin/env bash
# The HTTP comparison over real connections: wrk (2 threads, 64 connections, 10 s) against
# the same axum route bare and behind tiered-http's layer (1,000 warm resources, ~1 KiB each),
# one after the other in one run. Needs wrk (Debian package `wrk`).
#   bash benches/wrk.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install -y wrk"; exit 1; }
cargo build --release -q -p benches --example http_server
script=$(mktemp --suffix=.lua)
cat > "$script" <<'LUA'
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/items/" .. (n % 1000))
end
LUA
for mode in bare cached; do
  out=$(mktemp)
  target/release/examples/http_server "$mode" 0 > "$out" &
  pid=$!
  for _ in $(seq 100); do grep -q READY "$out" && break; sleep 0.2; done
  addr=$(grep -m1 READY "$out" | cut -d' ' -f2)
  echo "== $mode ($addr)"
  wrk -t2 -c64 -d10s --latency -s "$script" "http://$addr" | grep -E "Requests/sec|50%|99%|Non-2xx|Socket errors" || true
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  rm -f "$out"
done
rm -f "$script"
