#!/usr/bin/env bash
# The test command: installs what the tests need, then runs formatting, lint and every test.
# System tests (nftables in namespaces, PostgreSQL, R) fail instead of skipping under
# NOEXIT_CI=1, which this script sets.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/install-deps.sh
export NOEXIT_CI=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
cargo test --workspace --all-features --locked "$@"
