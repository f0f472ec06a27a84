#!/usr/bin/env bash
# Builds the control-plane programs from the pinned Go modules beside this script into a cache
# directory outside the repository, and prints that bin directory. A second run reuses it.
#   kube/  etcd (go.etcd.io/etcd/server/v3, the version k8s.io/kubernetes pins), kube-apiserver,
#          kube-controller-manager, kube-scheduler, kubectl (k8s.io/kubernetes, one release)
#   kwok/  kwok (sigs.k8s.io/kwok: fake nodes; scheduled pods become Running with an IP)
#   helm/  helm (helm.sh/helm/v4)
# Cache: ${NOEXIT_CACHE:-$HOME/.cache/noexit}/control-plane/<hash of the go.mod/go.sum files>/bin
# Builds run under `nice -n 15` (shared machines). Needs Go >= 1.26 and the Go module proxy.
#   hack/control-plane/build.sh          # builds what is missing, prints the bin directory
#   BIN=$(hack/control-plane/build.sh)   # quiet on stdout except for that path
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "control-plane/build: go is not installed" >&2; exit 1; }
# Bump when the build steps below change what they produce.
BUILD_ID=1
hash=$( (cd "$here" && echo "$BUILD_ID" && cat kube/go.mod kube/go.sum kube/etcd/main.go kwok/go.mod kwok/go.sum \
  helm/go.mod helm/go.sum) | sha256sum | cut -c1-16)
bin=${NOEXIT_CACHE:-$HOME/.cache/noexit}/control-plane/$hash/bin
mkdir -p "$bin"
export GOFLAGS=-mod=readonly
export CGO_ENABLED=0

# build MODULE NAME PACKAGE [ldflags...]
build() {
  local module=$1 name=$2 pkg=$3 ldflags=${4:-}
  [ -x "$bin/$name" ] && return 0
  local start=$SECONDS
  echo "control-plane/build: $name ($pkg)" >&2
  (cd "$here/$module" && nice -n 15 go build -trimpath -ldflags "-s -w $ldflags" -o "$bin/$name.tmp" "$pkg")
  mv "$bin/$name.tmp" "$bin/$name"
  echo "control-plane/build: $name built in $((SECONDS - start)) s" >&2
}

kver=$(cd "$here/kube" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
kminor=$(echo "$kver" | cut -d. -f2)
kv="-X k8s.io/component-base/version.gitVersion=$kver -X k8s.io/component-base/version.gitMajor=1"
kv="$kv -X k8s.io/component-base/version.gitMinor=$kminor -X k8s.io/component-base/version.gitTreeState=clean"
kv="$kv -X k8s.io/client-go/pkg/version.gitVersion=$kver -X k8s.io/client-go/pkg/version.gitMajor=1"
kv="$kv -X k8s.io/client-go/pkg/version.gitMinor=$kminor"
total=$SECONDS
build kube etcd ./etcd
for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  build kube "$c" "k8s.io/kubernetes/cmd/$c" "$kv"
done
build kwok kwok sigs.k8s.io/kwok/cmd/kwok
# kwok's stages (what happens to Nodes and Pods it manages), from the same module: nodes become
# Ready and keep their Lease; pods become Running with an IP, complete, and are deleted.
if [ ! -s "$bin/kwok-stages.yaml" ]; then
  kwok_dir=$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
    pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
    echo "---"
    cat "$kwok_dir/kustomize/stage/$f.yaml"
  done >"$bin/kwok-stages.yaml.tmp"
  mv "$bin/kwok-stages.yaml.tmp" "$bin/kwok-stages.yaml"
fi
build helm helm helm.sh/helm/v4/cmd/helm
[ $((SECONDS - total)) -gt 1 ] && echo "control-plane/build: done in $((SECONDS - total)) s" >&2
echo "$bin"
