#!/usr/bin/env bash
# The main job: the example project (examples/single-host/ward-7.yaml) as libvirt VMs on this
# host, by `noexit-operator up` in the foreground. Ctrl-C stops `up` (the VMs and walls stay);
# `target/debug/noexit-operator down` stops them and removes the networks and walls, keeping the
# home disks. Needs root on Debian 12 and Rust (cargo). It
#   1. installs the Debian packages (hack/install-deps.sh; idempotent: libvirt, QEMU, dnsmasq,
#      xorriso, mmdebstrap, … and what the tests need);
#   2. builds noexit-operator and noexit-agent (cargo build, debug);
#   3. probes KVM (`noexit-operator kvm-probe`, what `up --virt-type auto` does: /dev/kvm must
#      create a VM and not be the paravirtual kvm-pvm), and starts virtlogd and libvirtd unless
#      they run (no init system needed); where KVM is unusable libvirtd starts with /dev/kvm
#      hidden (its own KVM probe would hang) and the VMs run under TCG emulation;
#   4. builds the tiny VM image (images/vm/build.sh tiny: Debian's kernel + an initramfs with the
#      agent, ~1 min the first time, cached in ~/.cache/noexit/vm) and copies it to
#      /var/lib/noexit/images/tiny (vmlinuz, initrd.img, cmdline), where qemu can read it;
#      with IMAGE=workspace the workspace image instead (images/vm/build.sh workspace: Debian 12
#      with R and Xfce, ~18 min the first time) to /var/lib/noexit/images/workspace-<build hash>
#      (vmlinuz, initrd.img, workspace.qcow2: kernel boot of an overlay of the root disk per
#      workspace), and runs a copy of the example that names it (in the state directory);
#   5. makes the datasets: read-only ext4 disk images of SYNTHETIC CSV data (generated here, no
#      real patients) at /var/lib/noexit/datasets/{icu-2019,cohort-2024}.img, unless present;
#   6. execs `noexit-operator up -f examples/single-host/ward-7.yaml`, which prints each step
#      (define network, apply table, define domain, start …) and re-reads the file every 5 s.
# Environment: IMAGE (tiny or workspace; default tiny), AGENT (the agent baked into the image;
# default target/debug/noexit-agent), NOEXIT_STATE_DIR (default /var/lib/noexit/host), NOEXIT_VIRT_TYPE (auto, kvm or
# qemu; default: the probe above), NOEXIT_LIBVIRT_URI (default qemu:///system). Arguments go to
# `up`, e.g. hack/up.sh --api-port 18443 --mirror-port 18080 --dns-port 15353 --subnet-base 10.150.0.0
# Then: target/debug/noexit-operator status   (phases, last heartbeat, egress lock)
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "up.sh: $*" >&2; }
[ "$(id -u)" -eq 0 ] || {
  say "run as root: libvirt's system daemon, nftables walls and /var/lib/noexit need it"
  exit 1
}
images=/var/lib/noexit/images
datasets=/var/lib/noexit/datasets
manifest=examples/single-host/ward-7.yaml
uri=${NOEXIT_LIBVIRT_URI:-qemu:///system}
image=${IMAGE:-tiny}
case $image in
tiny | workspace) ;;
*)
  say "IMAGE=${IMAGE}: the image is tiny (default) or workspace"
  exit 2
  ;;
esac

say "1/6 Debian packages (hack/install-deps.sh)"
hack/install-deps.sh >&2
command -v cargo >/dev/null || {
  say "cargo is not installed: install Rust (https://rustup.rs), then run this again"
  exit 1
}

say "2/6 building noexit-operator and noexit-agent (cargo build)"
cargo build --locked -q -p noexit-operator -p noexit-agent --bins
bin=$PWD/target/debug/noexit-operator

say "3/6 KVM or TCG; virtlogd and libvirtd"
# `up` decides the same way (and `status` says why); here it only says how to start libvirtd.
virt=${NOEXIT_VIRT_TYPE:-auto}
if [ "$virt" = auto ]; then
  if why=$(timeout 10 "$bin" kvm-probe 2>&1); then virt=kvm; else virt=qemu; fi
  say "   virtualisation: $virt${why:+ ($why)}"
fi
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
  if [ "$virt" = qemu ] && [ -e /dev/kvm ]; then
    # libvirtd's capability probe tries KVM first and hangs where KVM does: hide it from libvirtd.
    unshare -m --propagation private sh -c 'mount --bind /dev/null /dev/kvm && exec libvirtd -d'
  else
    libvirtd -d
  fi
  say "   started libvirtd"
fi
for _ in $(seq 60); do
  virsh -c "$uri" version >/dev/null 2>&1 && break
  sleep 0.5
done
virsh -c "$uri" version >/dev/null || {
  say "libvirtd does not answer at $uri"
  exit 1
}

built=$(images/vm/build.sh "$image")
# tiny: one directory, replaced file by file. workspace: a directory per build (the build's
# cache name, e.g. workspace-a84704d78d5d410f), never replaced in place: each workspace's root
# is an overlay on workspace.qcow2, which reads garbage on a changed base; a new directory makes
# `up` redefine the domains and start their roots afresh on the new disk (homes stay).
dest=$images/tiny
[ "$image" = workspace ] && dest=$images/$(basename "$built")
say "4/6 the VM image (images/vm/build.sh $image) -> $dest"
install -d -m 0755 "$images" "$dest"
files="vmlinuz initrd.img"
[ "$image" = workspace ] && files="$files workspace.qcow2"
for f in $files; do
  # A new copy beside, then renamed: a running VM keeps the file it booted.
  cmp -s "$built/$f" "$dest/$f" || {
    install -m 0644 "$built/$f" "$dest/.$f.new"
    mv "$dest/.$f.new" "$dest/$f"
  }
done
if [ "$image" = tiny ]; then
  # No noexit.test=1: the test image's root shell on ttyS1 stays closed.
  echo "console=ttyS0 quiet" >"$images/tiny/cmdline"
else
  # No cmdline file: `up` boots kernel + root disk with `console=ttyS0 root=LABEL=noexit-root ro`.
  # The example names the tiny image; this copy names the workspace image, with the memory
  # Debian + Xfce need. `up` re-reads this copy, not the example.
  state=${NOEXIT_STATE_DIR:-/var/lib/noexit/host}
  mkdir -p "$state" # `up` sets its mode
  sed -e "s#image: $images/tiny#image: $dest#" -e 's#memory: 256Mi#memory: 1Gi#' \
    "$manifest" >"$state/ward-7-workspace.yaml"
  manifest=$state/ward-7-workspace.yaml
  say "   manifest: $manifest (examples/single-host/ward-7.yaml with $dest, 1Gi)"
  say "   older $images/workspace-* directories are not removed: delete those no workspace names"
fi

say "5/6 synthetic datasets -> $datasets"
install -d -m 0755 "$datasets"
# make_dataset NAME GENERATOR: an ext4 image of the files GENERATOR writes into its argument.
make_dataset() {
  local name=$1 gen=$2 img=$datasets/$1.img tree
  [ -f "$img" ] && return 0
  tree=$(mktemp -d)
  "$gen" "$tree"
  printf '%s\n' "SYNTHETIC DATA: made up by noexit's hack/up.sh for the single-host example." \
    "No real person is in it. Dataset: $name." >"$tree/README.txt"
  chmod -R a+rX,go-w "$tree"
  mkfs.ext4 -q -F -L "$name" -E root_owner=0:0 -d "$tree" "$img.new" 8M >/dev/null
  rm -rf "$tree"
  chmod 0444 "$img.new"
  mv "$img.new" "$img"
  say "   made $img"
}
icu_2019() {
  awk 'BEGIN {
    srand(2019); print "patient_id,age_band,sex,admitted,sofa_score,sepsis,los_days,died_28d"
    for (i = 1; i <= 400; i++) {
      a = 20 + 10 * int(rand() * 7); m = 1 + int(rand() * 12); d = 1 + int(rand() * 28)
      sex = rand() < 0.55 ? "M" : "F"; sofa = int(rand() * 16); sepsis = rand() < 0.3 ? "yes" : "no"
      los = 1 + int(rand() * 21); died = rand() < 0.18 ? "yes" : "no"
      printf "SYN-%05d,%d-%d,%s,2019-%02d-%02d,%d,%s,%d,%s\n", i, a, a + 9, sex, m, d, sofa, sepsis, los, died
    }
  }' >"$1/admissions.csv"
}
cohort_2024() {
  awk 'BEGIN {
    srand(2024); print "cohort_id,age_band,followup_days,eq5d_index,readmitted"
    for (i = 1; i <= 250; i++) {
      a = 30 + 10 * int(rand() * 6); f = 90 + int(rand() * 275); q = 0.2 + rand() * 0.8
      r = rand() < 0.22 ? "yes" : "no"
      printf "COH-%04d,%d-%d,%d,%.3f,%s\n", i, a, a + 9, f, q, r
    }
  }' >"$1/followup.csv"
}
make_dataset icu-2019 icu_2019
make_dataset cohort-2024 cohort_2024

say "6/6 noexit-operator up -f $manifest $* (state: ${NOEXIT_STATE_DIR:-/var/lib/noexit/host}; Ctrl-C stops)"
exec "$bin" up -f "$manifest" "$@"
