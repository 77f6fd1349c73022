#!/usr/bin/env bash
# Benchmarks of issues 5, 11, 12 and 13: builds in release mode, starts
# Mosquitto, vllm-sim (one, or three for routing and failover), mqtt-echo,
# Redis (9, 10) and vllm-mqttd (one, or 1, 2 and 4 in a share group for 10)
# on loopback (free ports), drives them with vllm-stress and selfbench,
# prints one markdown table and writes bench/results/<YYYY-MM-DD>.json
# (every raw number and the machine).
#
# Scenarios: 1 overhead, 2 saturation, 3 burst, 4 sessions, 5 worker sweep,
# 6 routing, 7 workers auto, 8 failover, 9 store cost (memory vs redis),
# 10 instances (1, 2, 4 with one Redis), 11 streaming (time to first delta
# over HTTP's time to first token, messages and daemon CPU per request).
#
#   scripts/bench.sh            # every scenario, 3 repetitions (about 29 min on 2 cores:
#                               # 1-5 about 13, 6 routing 5, 7 auto 5, 8 failover 1,
#                               # 9 store cost 1.3, 10 instances 1.3, 11 streaming 2.3)
#   scripts/bench.sh --quick    # each scenario briefly, once (about 7 min)
#   scripts/bench.sh --only 6,7,8 --keep-logs   # see scripts/bench.py --help
#   scripts/bench.sh --only 9,10 --out bench/results/2026-12-07-issue12.json
#   scripts/bench.sh --only 11 --out bench/results/2026-12-07-issue13.json
#
# CARGO_TARGET_DIR is honoured (the binaries are taken from its release/).
#
# The scenarios and their targets are described in scripts/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s.%N)

command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 69; }
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
if [ ! -x "$MOSQUITTO" ]; then
  if command -v mosquitto >/dev/null; then MOSQUITTO=$(command -v mosquitto)
  else
    echo "bench: installing mosquitto (apt)" >&2
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
    MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
  fi
fi
export MOSQUITTO

# Scenarios 9 and 10 need Redis (redis-server and redis-cli): installed with
# apt if missing, unless --only leaves both out. bench.py starts its own on
# a free loopback port without persistence (--save '' --appendonly no).
only=1,2,3,4,5,6,7,8,9,10,11
prev=
for a in "$@"; do
  case "$a" in --only=*) only=${a#--only=} ;; esac
  [ "$prev" = --only ] && only=$a
  prev=$a
done
if [[ ",$only," =~ ,(9|10), ]]; then
  REDIS_SERVER=${REDIS_SERVER:-$(command -v redis-server || true)}
  REDIS_CLI=${REDIS_CLI:-$(command -v redis-cli || true)}
  if [ -z "$REDIS_SERVER" ] || [ -z "$REDIS_CLI" ]; then
    echo "bench: installing redis-server (apt)" >&2
    as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
    REDIS_SERVER=$(command -v redis-server || echo /usr/bin/redis-server)
    REDIS_CLI=$(command -v redis-cli || echo /usr/bin/redis-cli)
  fi
  export REDIS_SERVER REDIS_CLI
fi

# Every process the driver starts is recorded here ("pid exe"), so that this
# trap can stop any it could not (the driver itself stops them on exit, on
# an error, on Ctrl-C and on SIGTERM). Only pids whose executable is still
# the one we started are signalled.
BENCH_PIDFILE=$(mktemp -t vllm-bench-pids.XXXXXX)
export BENCH_PIDFILE
ours() { [ -n "$1" ] && [ "$(readlink "/proc/$1/exe" 2>/dev/null)" = "$2" ]; }
cleanup() {
  local pid exe left i
  while read -r pid exe; do
    if ours "$pid" "$exe"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done <"$BENCH_PIDFILE"
  for i in $(seq 50); do # up to 5 s for them to exit, then SIGKILL
    left=0
    while read -r pid exe; do
      if ours "$pid" "$exe"; then left=1; fi
    done <"$BENCH_PIDFILE"
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  while read -r pid exe; do
    if ours "$pid" "$exe"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done <"$BENCH_PIDFILE"
  rm -f "$BENCH_PIDFILE"
}
trap cleanup EXIT

# The binaries are taken from $CARGO_TARGET_DIR/release if it is set (bench.py
# reads it too), else target/release.
echo "bench: cargo build --release --workspace --bins --examples (into ${CARGO_TARGET_DIR:-target})" >&2
b0=$(date +%s.%N)
cargo build --release --workspace --bins --examples
b1=$(date +%s.%N)
build_secs=$(python3 -c "print(round($b1 - $b0, 1))")
echo "bench: build took ${build_secs} s" >&2

# The driver runs as a child that this shell waits for, so that INT, TERM and
# HUP sent to this shell alone (kill, a CI runner) reach it too: it then
# stops everything it started and exits; the EXIT trap sweeps up after it.
python3 scripts/bench.py --build-secs "$build_secs" --started "$started" "$@" &
child=$!
trap 'kill -INT "$child" 2>/dev/null || true' INT
trap 'kill -TERM "$child" 2>/dev/null || true' TERM
trap 'kill -HUP "$child" 2>/dev/null || true' HUP
status=0
wait "$child" || status=$?
# A trapped signal ends `wait` early: wait until the driver has cleaned up.
while kill -0 "$child" 2>/dev/null; do
  status=0
  wait "$child" || status=$?
done
exit "$status"
