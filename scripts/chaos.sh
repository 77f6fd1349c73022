#!/usr/bin/env bash
# The long version of tests/chaos.rs: a bigger load under each nemesis
# (kill -9 of the daemon, a Mosquitto crash, a 30 s backend outage with
# stalls and resets, SIGTERM), classified by the queue checker. Prints one
# table row per scenario; exits non-zero if any request was lost.
#
#   scripts/chaos.sh                       # 50 sessions x 100 requests, 30 s outage
#   CHAOS_SESSIONS=200 CHAOS_MESSAGES=50 scripts/chaos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CHAOS_SESSIONS="${CHAOS_SESSIONS:-50}"
export CHAOS_MESSAGES="${CHAOS_MESSAGES:-100}"
export CHAOS_OUTAGE_MS="${CHAOS_OUTAGE_MS:-30000}"
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || {
  apt-get update -qq && apt-get install -y -qq --no-install-recommends mosquitto >/dev/null; }
echo "chaos: ${CHAOS_SESSIONS} sessions x ${CHAOS_MESSAGES} requests per scenario, outage ${CHAOS_OUTAGE_MS} ms" >&2
out=$(mktemp)
status=0
cargo test --release --test chaos -- --nocapture --test-threads 1 >"$out" 2>&1 || status=$?
echo "| scenario | sent | ok | errors (answered with a reason) | lost | duplicated | unexpected |"
echo "|---|---|---|---|---|---|---|"
grep -E '^\| [a-zA-Z]' "$out" | grep -v '^| scenario' || true
if [ "$status" -ne 0 ]; then
  grep -E 'panicked|lost requests|FAILED' "$out" >&2 || true
  echo "chaos: FAILED (log: $out)" >&2
  exit "$status"
fi
rm -f "$out"
