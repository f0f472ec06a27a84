#!/usr/bin/env bash
# Single-host mode benchmark (root; libvirtd running, see docs/admin.md "Single-host mode"):
#   1. time from `noexit-operator up` to the first agent heartbeat of every workspace, for 1 and
#      for 5 workspaces of one project (TCG: --virt-type qemu; KVM cannot be measured on these
#      machines), and the host memory (RSS of the qemu processes) per idle VM;
#   2. reconcile time for 50 workspaces when nothing changed (libvirt's test:///default driver,
#      in-process: the passes after the first find nothing to do).
# Usage: hack/bench/host/run.sh [COUNTS...]   (default: 1 5)
# Everything is named with a random tag and removed at the end.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../../.." && pwd)
bin=$repo/target/release/noexit-operator
[ -x "$bin" ] || bin=$repo/target/debug/noexit-operator
[ -x "$bin" ] || { echo "build first: cargo build -p noexit-operator" >&2; exit 1; }
counts=("${@:-1 5}")
[ $# -gt 0 ] || counts=(1 5)
tiny=$("$repo/images/vm/build.sh" tiny)
tag=$(head -c3 /dev/urandom | od -An -tx1 | tr -d ' \n')
work=$(mktemp -d /tmp/noexit-host-bench.XXXXXX)
chmod 711 "$work"
trap 'rm -rf "$work"' EXIT
mkdir "$work/image"
cp "$tiny/vmlinuz" "$tiny/initrd.img" "$work/image/"
echo "console=ttyS0 noexit.test=1 quiet" >"$work/image/cmdline"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])'; }

manifests() { # project count image
  printf 'apiVersion: noexit.io/v1alpha1\nkind: Project\nmetadata: {name: %s}\nspec:\n  displayName: bench\n  members: [{user: r@x, roles: [researcher, admin]}]\n  approval: {reference: B-1, expires: "2099-01-01"}\n' "$1"
  for i in $(seq 1 "$2"); do
    printf -- '---\napiVersion: noexit.io/v1alpha1\nkind: Workspace\nmetadata: {name: w%s, namespace: noexit-%s}\nspec:\n  project: %s\n  owner: r@x\n  runtime: vm\n  image: %s\n  resources: {cpu: "1", memory: 256Mi, homeSize: 64Mi}\n' "$i" "$1" "$1" "$3"
  done
}

for n in "${counts[@]}"; do
  p=bench$tag$n
  state=$work/state-$n
  manifests "$p" "$n" "$work/image" >"$work/m-$n.yaml"
  : >"$work/empty.yaml"
  common=(--state-dir "$state" --virt-type qemu --api-port "$(port)" --mirror-port "$(port)" --dns-port "$(port)" --subnet-base "10.$((150 + n)).0.0")
  start=$(date +%s.%N)
  "$bin" up "${common[@]}" -f "$work/m-$n.yaml" >"$work/up-$n.log" 2>&1 &
  up=$!
  while :; do
    got=$(sqlite3 -readonly "$state/api.db" "SELECT COUNT(*) FROM agent_heartbeats" 2>/dev/null || echo 0)
    [ "${got:-0}" -ge "$n" ] && break
    kill -0 $up 2>/dev/null || { echo "up exited:"; tail "$work/up-$n.log"; exit 1; }
    [ "$(echo "$(date +%s.%N) - $start > 900" | bc)" = 1 ] && { echo "no heartbeats after 900 s"; kill $up; exit 1; }
    sleep 0.5
  done
  t=$(echo "$(date +%s.%N) - $start" | bc)
  sleep 30 # idle: boot finished, agents in their heartbeat loop
  rss=0
  for i in $(seq 1 "$n"); do
    pid=$(cat "/run/libvirt/qemu/noexit-$p-w$i.pid")
    r=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
    rss=$((rss + r))
  done
  printf 'workspaces=%s  up→all heartbeats: %.1f s  qemu RSS per idle VM: %d MiB (TCG, 256 MiB guest)\n' "$n" "$t" $((rss / n / 1024))
  kill $up; wait $up 2>/dev/null || true
  "$bin" up "${common[@]}" --once -f "$work/empty.yaml" >/dev/null 2>&1
done

# 50 workspaces, nothing changed: libvirt's test driver (no VMs boot; real nft, seeds, SQLite).
p=bench${tag}r
mkdir -p "$work/fake"
: >"$work/fake/vmlinuz"
: >"$work/fake/initrd.img"
manifests "$p" 50 "$work/fake" >"$work/m-50.yaml"
"$bin" up --state-dir "$work/state-50" --libvirt-uri test:///default --virt-type qemu --subnet-base 10.149.0.0 \
  --once --passes 6 -f "$work/m-50.yaml" 2>/dev/null | grep '^reconciled' | tee "$work/passes.txt"
nft delete table inet "noexit-$p" 2>/dev/null || true
first=$(head -1 "$work/passes.txt" | sed 's/.* in \([0-9]*\) ms.*/\1/')
rest=$(tail -n +2 "$work/passes.txt" | sed 's/.* in \([0-9]*\) ms.*/\1/' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "50 workspaces: first pass (creates all) ${first} ms; unchanged pass median ${rest} ms (test:///default)"
