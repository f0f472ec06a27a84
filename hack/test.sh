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
# The e2e suite (tests/cluster.rs) runs on a real control plane: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok, built once from hack/control-plane's Go
# modules into a cache outside the repo, with the chart installed by helm and the operator's
# controller, webhook and API running from this build. Stopped on exit, even on failure.
cargo build --workspace --all-features --locked --bins
trap 'hack/dev-cluster.sh down' EXIT
EXAMPLES=0 CARGO_BUILD=0 hack/dev-cluster.sh up
# shellcheck source=/dev/null
. "$(hack/control-plane/control-plane.sh dir)/env"
cargo test --workspace --all-features --locked "$@"
