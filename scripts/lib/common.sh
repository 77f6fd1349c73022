# Shared shell helpers for scripts/demo.sh and scripts/e2e-real.sh.
# Sourced, not run. Needs bash and python3 (no curl, no nc).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Everything these scripts build or download lives here (git-ignored).
CACHE_DIR="${VLLM_MQTTD_CACHE_DIR:-$ROOT/.cache}"

if [ -t 1 ]; then
  C_B=$'\e[1m'; C_G=$'\e[32m'; C_R=$'\e[31m'; C_Y=$'\e[33m'; C_0=$'\e[0m'
else
  C_B=; C_G=; C_R=; C_Y=; C_0=
fi

say()  { printf '%s==>%s %s\n' "$C_B" "$C_0" "$*" >&2; }
warn() { printf '%swarning:%s %s\n' "$C_Y" "$C_0" "$*" >&2; }
die()  { printf '%serror:%s %s\n' "$C_R" "$C_0" "$*" >&2; exit 1; }

# Seconds since the epoch, with a fraction.
now() { date +%s.%N; }
# Seconds elapsed since $1, one decimal.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# --- child processes ----------------------------------------------------
# Every long-running child is started with `spawn NAME LOGFILE CMD...`; the
# EXIT trap (install_cleanup) stops each of them by its pid: SIGTERM, then
# SIGKILL after a bound. Children run in their own session (setsid), so a
# Ctrl-C in the terminal reaches only the foreground program and this
# script, which then stops the children in order.
CHILD_PIDS=()
CHILD_NAMES=()
LAST_PID=

spawn() {
  local name="$1" log="$2"; shift 2
  mkdir -p "$(dirname "$log")"
  if command -v setsid >/dev/null 2>&1; then
    setsid "$@" >"$log" 2>&1 </dev/null &
  else
    "$@" >"$log" 2>&1 </dev/null &
  fi
  LAST_PID=$!
  CHILD_PIDS+=("$LAST_PID")
  CHILD_NAMES+=("$name")
}

# Stops one child (by pid): SIGTERM, wait up to $2 seconds, then SIGKILL.
# Sets STOP_STATUS to its exit status (137 when it had to be killed).
STOP_STATUS=
stop_pid() {
  local pid="$1" bound="${2:-15}" i
  STOP_STATUS=0
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid" 2>/dev/null && STOP_STATUS=0 || STOP_STATUS=$?
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < bound * 10; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null && STOP_STATUS=0 || STOP_STATUS=$?
      return 0
    fi
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null && STOP_STATUS=0 || STOP_STATUS=$?
  return 0
}

# Stops every child, newest first (the daemon before the model server).
cleanup_children() {
  local i
  for ((i = ${#CHILD_PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${CHILD_PIDS[$i]}" 15
  done
  CHILD_PIDS=()
  CHILD_NAMES=()
}

# Forgets a child that was stopped on purpose.
forget_pid() {
  local pid="$1" i
  local -a p=() n=()
  for ((i = 0; i < ${#CHILD_PIDS[@]}; i++)); do
    if [ "${CHILD_PIDS[$i]}" != "$pid" ]; then p+=("${CHILD_PIDS[$i]}"); n+=("${CHILD_NAMES[$i]}"); fi
  done
  CHILD_PIDS=("${p[@]}")
  CHILD_NAMES=("${n[@]}")
}

install_cleanup() {
  trap 'rc=$?; trap "" INT TERM HUP; trap - EXIT; cleanup_children; exit $rc' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  trap 'exit 129' HUP
}

# Is a child still alive? Prints the tail of its log and dies if not.
require_alive() {
  local pid="$1" name="$2" log="$3"
  if ! kill -0 "$pid" 2>/dev/null; then
    printf '%s--- last lines of %s ---%s\n' "$C_B" "$log" "$C_0" >&2
    tail -n 30 "$log" >&2 || true
    die "$name exited early (log: $log)"
  fi
}

# --- network ------------------------------------------------------------
# Exit 0 when something accepts TCP connections on 127.0.0.1:$1.
port_busy() {
  python3 - "$1" <<'PY'
import socket, sys
port = int(sys.argv[1])
s = socket.socket()
s.settimeout(0.5)
try:
    s.connect(("127.0.0.1", port))
    sys.exit(0)
except OSError:
    pass
finally:
    s.close()
b = socket.socket()
# SO_REUSEADDR as the listeners set it (tokio does): a port whose old
# connections linger in TIME_WAIT is free for them.
b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    b.bind(("127.0.0.1", port))
except OSError:
    sys.exit(0)
finally:
    b.close()
sys.exit(1)
PY
}

# Prints a free loopback port; with `free_port 2`, the first of two free
# consecutive ports.
free_port() {
  python3 - "${1:-1}" <<'PY'
import random, socket, sys
n = int(sys.argv[1])
def free(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
for _ in range(500):
    p = random.randint(20000, 60000 - n)
    if all(free(p + i) for i in range(n)):
        print(p)
        sys.exit(0)
sys.exit("no free loopback port found")
PY
}

# GET a URL; prints the body; exit 0 on HTTP 2xx. $2 = timeout seconds.
http_get() {
  python3 - "$1" "${2:-3}" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        sys.stdout.write(r.read().decode("utf-8", "replace"))
        sys.exit(0 if 200 <= r.status < 300 else 1)
except Exception as e:
    sys.stderr.write(str(e) + "\n")
    sys.exit(1)
PY
}

# Exit 0 when $1 (an OpenAI base URL, ending in /v1) lists a model.
backend_answers() {
  local body
  body="$(http_get "${1%/}/models" 3 2>/dev/null)" || return 1
  printf '%s' "$body" | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if d.get("data") else 1)' 2>/dev/null
}

# The first model id that $1 (an OpenAI base URL) lists.
backend_model() {
  http_get "${1%/}/models" 3 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])' 2>/dev/null
}

# Waits until a line matching the extended regex $2 appears in file $1,
# for at most $3 seconds, while pid $4 (if given) is alive.
wait_log() {
  local file="$1" re="$2" bound="$3" pid="${4:-}" i
  for ((i = 0; i < bound * 10; i++)); do
    if [ -f "$file" ] && grep -Eq "$re" "$file"; then return 0; fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}

# --- builds -------------------------------------------------------------
# The daemon and the client tools, release mode.
build_rust() {
  local t0; t0="$(now)"
  say "building vllm-mqttd and vllm-chat (cargo build --release; minutes the first time)"
  (cd "$ROOT" && cargo build --release --locked -p vllm-mqttd -p vllm-chat --bins) \
    || die "cargo build failed"
  say "built in $(since "$t0") s"
  local target="${CARGO_TARGET_DIR:-$ROOT/target}"
  case "$target" in /*) ;; *) target="$ROOT/$target" ;; esac
  DAEMON_BIN="$target/release/vllm-mqttd"
  CHAT_BIN="$target/release/vllm-chat"
  STRESS_BIN="$target/release/vllm-stress"
}

# --- the daemon ---------------------------------------------------------
# Starts vllm-mqttd with its embedded broker on 127.0.0.1:$2 (MQTT 5 on
# $2+1) for the backend $3, logging to $4; extra arguments follow. Waits
# until it has subscribed and discovered the model. Sets DAEMON_PID.
start_daemon() {
  local instance="$1" port="$2" url="$3" log="$4" i t0
  shift 4
  t0="$(now)"
  spawn "vllm-mqttd ($instance)" "$log" "$DAEMON_BIN" \
    --embedded-broker "127.0.0.1:$port" --backend-url "$url" \
    --instance-id "$instance" --shutdown-grace 5s "$@"
  DAEMON_PID="$LAST_PID"
  for ((i = 0; i < 300; i++)); do
    require_alive "$DAEMON_PID" vllm-mqttd "$log"
    if grep -q 'subscribed' "$log" 2>/dev/null && grep -Eq 'models? discovered' "$log" 2>/dev/null; then
      DAEMON_UP_S="$(since "$t0")"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$log" >&2
  die "vllm-mqttd did not subscribe and discover the model within 30 s (log: $log)"
}

# The model the daemon discovered, from its log $1 ("model discovered
# model=X" or "models discovered ... models=["X", ...]").
daemon_model() {
  sed 's/\x1b\[[0-9;]*m//g' "$1" | grep -E 'models? discovered' | head -n 1 \
    | sed -nE 's/.*models=\["([^"]*)".*/\1/p; t; s/.*model=([^ ]*).*/\1/p'
}
