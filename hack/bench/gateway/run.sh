#!/usr/bin/env bash
# Benchmark: the same framebuffer stream read directly, through websockify (TLS) and through
# the gateway (TLS, signed-in session, RFB filter), in one run; then the gateway's memory with
# 1 and with $SESSIONS idle sessions. Loopback only. Not part of CI.
#
#   hack/bench/gateway/run.sh           # SECONDS_EACH=10 SESSIONS=200
#
# Needs websockify (Debian package; hack/install-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/../../.."
command -v websockify >/dev/null || { echo "websockify missing: sudo hack/install-deps.sh" >&2; exit 1; }
cargo build --release -q -p noexit-gateway --example gateway-bench
# Enough descriptors for 200 sessions (two sockets each, plus TLS).
ulimit -n 4096 || true
exec target/release/examples/gateway-bench
