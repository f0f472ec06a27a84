#!/usr/bin/env bash
# Installs the system packages noexit's tests use (Debian 12). Idempotent; needs root.
#   nftables, iproute2  egress-lock tests in network namespaces
#   iputils-ping        ICMP checks of the egress lock (agent/tests/egress_netns.rs)
#   postgresql          audit store on PostgreSQL (tests start private servers)
#   r-base-core         real R packages for the CRAN mirror tests
#   curl                the mirror tests fetch from inside network namespaces
#   openssl             certificates of the local control plane (hack/control-plane); with jq,
#                       the independent check of release receipts (operator/tests/outputs_cli.rs)
#   jq                  canonical receipt JSON in that check, as docs/auditor.md tells auditors
#   bind9-dnsutils      dig: the workspace DNS test queries from a workspace namespace
#   dnsmasq-base        the "outside" resolver of the DNS test, which logs every query it gets
#   novnc, tigervnc-standalone-server, chromium, xclip, xterm (and Node.js with npm)
#                       the gateway end-to-end test (operator/tests/gateway.rs): noVNC served by
#                       the gateway, Xvnc as the desktop, headless Chromium driven by
#                       playwright-core (npm ci in hack/test-support/browser; no browser download)
#   websockify          the gateway benchmark's reference proxy
#   qemu-system-x86, qemu-utils, xorriso, mmdebstrap, kmod, cpio, zstd, binutils, e2fsprogs
#                       the VM images (images/vm/build.sh: Debian packages by mmdebstrap, modules
#                       resolved by modprobe/depmod, the initramfs by cpio + zstd, the agent
#                       stripped) and their boot test (operator/tests/vm_image.rs: QEMU under TCG,
#                       the seed ISO by xorriso, disks by qemu-img and mkfs.ext4)
#   libvirt-dev, libvirt-daemon-system, libvirt-clients, dnsmasq-base, sqlite3
#                       single-host mode (`noexit-operator up`, crate noexit-host): the `virt`
#                       crate links libvirt; its e2e test (operator/tests/host.rs) runs libvirtd
#                       (qemu:///system, TCG) whose isolated networks use dnsmasq for the fixed
#                       leases, and reads the API's SQLite database with sqlite3
# The control plane itself (etcd, kube-apiserver, ..., kwok, kubectl, helm) is built from Go
# modules by hack/control-plane/build.sh with the machine's Go (/usr/local/go, >= 1.26).
# Benchmarks also want nginx and wrk (hack/bench/README.md), and dnsperf for the DNS server;
# tests do not.
set -euo pipefail
packages=(nftables iproute2 iputils-ping procps postgresql r-base-core curl ca-certificates openssl jq
  bind9-dnsutils dnsmasq-base novnc websockify tigervnc-standalone-server chromium xclip xterm)
# VM images and their boot test (images/vm/build.sh, operator/tests/vm_image.rs)
packages+=(qemu-system-x86 qemu-utils xorriso mmdebstrap kmod cpio zstd binutils e2fsprogs)
# Single-host mode (noexit-host links libvirt; operator/tests/host.rs runs libvirtd)
packages+=(libvirt-dev libvirt-daemon-system libvirt-clients sqlite3)
# Node.js (with npm) is a toolchain of these machines; Debian's packages only where it is absent
# (its npm package conflicts with a Node.js that brings its own npm).
command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
browser_deps() {
  local dir
  dir="$(cd "$(dirname "$0")" && pwd)/test-support/browser"
  if [ ! -d "$dir/node_modules/playwright-core" ]; then
    (cd "$dir" && npm ci --no-audit --no-fund --silent) && echo "install-deps: playwright-core installed in $dir"
  fi
}
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all present"
  browser_deps
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing ${missing[*]}; run as root (sudo $0)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: installed ${missing[*]}"
browser_deps
