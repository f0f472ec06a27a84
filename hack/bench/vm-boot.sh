#!/usr/bin/env bash
# Boot time of the tiny VM test image under TCG (no KVM on these machines): from starting
# qemu-system-x86_64 to the agent's first log line ("agent started") on the console, N boots, with
# the same seed / blank home disk / read-only dataset disk as operator/tests/vm_image.rs. Prints
# each boot, the median, the guest's own uptime at that line, and qemu's resident memory.
#   hack/bench/vm-boot.sh            # 5 boots, -m 256
#   RUNS=9 MEM=192 KERNEL=vmlinuz hack/bench/vm-boot.sh
# Needs: qemu-system-x86, xorriso, e2fsprogs (mkfs.ext4), qemu-utils, and what images/vm/build.sh
# needs; the agent binary (AGENT, default target/debug/noexit-agent).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=hack/bench/lib/seed.sh
. "$repo/hack/bench/lib/seed.sh"
runs=${RUNS:-5}
mem=${MEM:-256}
machine=${MACHINE:-q35}
kernel=${KERNEL:-vmlinux} # or vmlinuz: the same kernel, compressed (slower to start under TCG)
t0=$SECONDS
img=$("$repo/images/vm/build.sh" tiny)
echo "image: $img ($(du -sh "$img/$kernel" | cut -f1) $kernel, $(du -sh "$img/initrd.img" | cut -f1) initramfs; build/lookup $((SECONDS - t0)) s)"
work=$(mktemp -d)
qpid=
trap '[ -n "$qpid" ] && kill "$qpid" 2>/dev/null; rm -rf "$work"' EXIT
mkdir -p "$work/seed/tls" "$work/ds"
bench_agent_yaml "$work" boot none /home/researcher/outbox
bench_seed "$work" boot
echo data >"$work/ds/readme.txt"
mkfs.ext4 -q -d "$work/ds" "$work/ds.img" 16M

times=()
for i in $(seq 1 "$runs"); do
  rm -f "$work/home.qcow2" "$work/console.log"
  qemu-img create -q -f qcow2 "$work/home.qcow2" 1G
  start=$(date +%s%N)
  qemu-system-x86_64 -machine "$machine,accel=tcg" -m "$mem" -nodefaults -no-user-config -display none \
    -kernel "$img/$kernel" -initrd "$img/initrd.img" -append "console=ttyS0 quiet" \
    -serial "file:$work/console.log" \
    -drive "file=$work/seed.iso,media=cdrom,if=none,id=seed,readonly=on" -device ide-cd,drive=seed \
    -drive "file=$work/home.qcow2,if=none,id=home,format=qcow2" -device virtio-blk-pci,drive=home,serial=home \
    -drive "file=$work/ds.img,if=none,id=ds,format=raw,readonly=on" -device virtio-blk-pci,drive=ds,serial=ds-cohort \
    -nic user,model=virtio-net-pci,restrict=on &
  qpid=$!
  line=
  first=
  for _ in $(seq 1 1200); do # 120 s bound
    [ -z "$first" ] && grep -q "noexit-init: kernel" "$work/console.log" 2>/dev/null && first=$(date +%s%N)
    line=$(grep -m1 "agent started" "$work/console.log" 2>/dev/null || true)
    [ -n "$line" ] && break
    grep -q "exited with status\|FAILED" "$work/console.log" 2>/dev/null && break
    kill -0 "$qpid" 2>/dev/null || break
    sleep 0.1
  done
  end=$(date +%s%N)
  [ -n "$line" ] || {
    echo "boot $i: no 'agent started' line; console:" >&2
    cat "$work/console.log" >&2
    exit 1
  }
  ms=$(((end - start) / 1000000))
  rss=$(awk '/VmRSS/ { print int($2 / 1024) }' "/proc/$qpid/status")
  uptime=$(grep -m1 "starting noexit-agent" "$work/console.log" | sed 's/.*up \([0-9.]*\) s.*/\1/')
  init=$(grep -m1 "noexit-init: kernel" "$work/console.log" | sed 's/.*up \([0-9.]*\) s.*/\1/')
  # Before the kernel's clock starts: QEMU, firmware, loading and unpacking the kernel.
  pre=$(awk -v f="$(((first - start) / 1000000))" -v u="$init" 'BEGIN { printf "%.1f", f / 1000 - u }')
  echo "boot $i: ${ms} ms to 'agent started'; before the kernel ~${pre} s; guest uptime at /init ${init} s," \
    "at agent exec ${uptime} s; qemu RSS ${rss} MiB"
  times+=("$ms")
  kill "$qpid"
  wait "$qpid" 2>/dev/null || true
  qpid=
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }')
echo "median of $runs boots: ${median} ms (TCG, -machine $machine, -m $mem, $kernel)"
