#!/usr/bin/env bash
# The shared store's cost per request, memory vs redis in the same run:
# vllm-stress's latency table for each, the daemon's store round trips per
# request (its vllm_mqttd_store_calls_total, by operation), and Redis's own
# command counts (commands run inside the scripts are counted too, under
# their own names). scripts/bench.sh --only 9 is the measured benchmark.
# Usage: scripts/store-cost.sh [debug|release]   (builds first)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
if [ "$profile" = release ]; then cargo build --release -q; else cargo build -q; fi
B=target/$profile
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RP=$(port); MP=$(port); SP=$(port); XP=$(port)
out=$(mktemp -d)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 & RPID=$!
mosquitto -p "$MP" >/dev/null 2>&1 & MPID=$!
"$B/vllm-sim" --port "$SP" --model m --latency-scale 0 --output-tokens fixed:8 >"$out/sim.log" 2>&1 & SPID=$!
DPID=
trap 'kill $RPID $MPID $SPID $DPID 2>/dev/null || true' EXIT
sleep 1
for store in memory "redis://127.0.0.1:$RP"; do
  redis-cli -p "$RP" config resetstat >/dev/null
  "$B/vllm-mqttd" --mqtt-port "$MP" --backend-url "http://127.0.0.1:$SP/v1" --state-url "$store" \
    --instance-id store-cost --projects general --rate-limit 100000 \
    --metrics-addr "127.0.0.1:$XP" >"$out/daemon.log" 2>&1 & DPID=$!
  sleep 2
  "$B/vllm-stress" --mqtt-port "$MP" --clients 10 --messages 20 --sessions 10 --message hi \
    --format json >"$out/stress.txt" 2>&1 || true
  echo "== store: ${store%%:*}"
  grep -E "^requests|^ok |^lost " "$out/stress.txt"
  if [ "$store" != memory ]; then
    redis-cli -p "$RP" info commandstats | grep -E "cmdstat_(evalsha|eval|lrange):"
    curl -s "http://127.0.0.1:$XP/metrics" | python3 -c '
import re, sys
calls = {}
for line in sys.stdin:
    m = re.match(r"vllm_mqttd_store_calls_total\{(.*)\} (\S+)", line)
    if m:
        op = re.search(r"op=\"(\w+)\"", m.group(1)).group(1)
        calls[op] = calls.get(op, 0) + float(m.group(2))
total = sum(calls.values())
print("store round trips: %d, %.2f per request (%s)" % (total, total / 200,
      ", ".join("%s %d" % kv for kv in sorted(calls.items()))))'
  fi
  kill "$DPID"; wait "$DPID" 2>/dev/null || true; DPID=
done
