#!/usr/bin/env bash
# Copy the generated CRDs (crds/*.yaml, written by `cargo run -p noexit-crds --bin crdgen -- crds/`)
# into the Helm chart, which installs charts/noexit/crds/ before its templates.
# `cargo test -p noexit-crds --test chart` fails when the two differ.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f charts/noexit/crds/*.yaml
cp crds/*.yaml charts/noexit/crds/
set -- charts/noexit/crds/*.yaml
echo "sync-chart-crds: $# CRDs copied to charts/noexit/crds/"
