#!/usr/bin/env bash
# The workspace image's desktop, seen the way single-host mode's gateway sees it: boots
# workspace.qcow2 under TCG with the devices operator/host/src/render/domain.rs gives a domain
# (machine pc, standard VGA, a virtio tablet, no USB controller, the VNC console behind a
# password) and reads the console through QEMU's VNC server.
#   sudo hack/bench/vm-desktop.sh                  # single-host: Xfce on the VM's own display
#   sudo MODE=tigervnc hack/bench/vm-desktop.sh    # KubeVirt: /etc/noexit/vnc/passwd present
# console (default): waits until the console shows Xfce with its panel (QMP screendump, polled),
#   reads one frame over RFB with the console password (a wrong one must be refused), opens the
#   applications menu with a click and closes it with Escape through the VNC console, checks
#   that noexit-console-desktop started and TigerVNC did not, then lets the desktop idle (IDLE s, default 60) and reads the guest's
#   memory (virtio-balloon statistics: this device is the bench's, the domain has none).
# tigervnc: the same disk with a password file written into the root file system (as cloud-init
#   would): TigerVNC answers on the guest's port 5901 (forwarded to 127.0.0.1) with that
#   password and shows Xfce, the console desktop does not start and the console shows no desktop.
# Prints figures, keeps screenshots (PNG) and the serial console log in OUT (default a new
# directory under /tmp, printed). On demand only: the image takes 6-18 min to build cold.
# Needs: root (the image build), qemu-system-x86, qemu-utils, xorriso, openssl, e2fsprogs
# (debugfs, for MODE=tigervnc), python3 with python3-cryptography (VNC authentication).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=hack/bench/lib/seed.sh
. "$repo/hack/bench/lib/seed.sh"
mode=${MODE:-console}
mem=${MEM:-1024}
cpus=${CPUS:-1}
idle=${IDLE:-60}
timeout=${TIMEOUT:-900} # s, boot to desktop; TCG on a busy 2-core machine is slow
screen() { python3 "$repo/hack/bench/console_screen.py" "$@"; }
case $mode in console | tigervnc) ;; *)
  echo "MODE is console or tigervnc" >&2
  exit 2
  ;;
esac

t0=$SECONDS
img=$("$repo/images/vm/build.sh" workspace)
echo "image: $img ($(du -m "$img/workspace.qcow2" | cut -f1) MB workspace.qcow2; build/lookup $((SECONDS - t0)) s)"
out=${OUT:-$(mktemp -d /tmp/vm-desktop.XXXXXX)}
mkdir -p "$out"
work=$(mktemp -d)
qpid=
trap '[ -n "$qpid" ] && kill "$qpid" 2>/dev/null; rm -rf "$work"' EXIT

# The seed, as single-host mode writes it (agent.yaml with desktop: vnc, a gateway source).
mkdir -p "$work/seed/tls"
bench_agent_yaml "$work" desktop vnc /outbox 10.0.2.2/32
bench_seed "$work" desktop
qemu-img create -q -f qcow2 "$work/home.qcow2" 2G

password=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n') # 12 hex digits; VNC uses 8
password=${password:0:8}
if [ "$mode" = console ]; then
  qemu-img create -q -f qcow2 -b "$img/workspace.qcow2" -F qcow2 "$work/root.qcow2"
  root=(-drive "file=$work/root.qcow2,if=none,id=root,format=qcow2")
else
  # What cloud-init does on KubeVirt: the password file, owned by the researcher, mode 0400.
  qemu-img convert -O raw "$img/workspace.qcow2" "$work/root.raw"
  screen passwd-file "$password" "$work/passwd"
  debugfs -w "$work/root.raw" -f - >/dev/null 2>&1 <<EOF
mkdir /etc/noexit
mkdir /etc/noexit/vnc
cd /etc/noexit/vnc
write $work/passwd passwd
sif passwd uid 1000
sif passwd gid 1000
sif passwd mode 0100400
EOF
  debugfs -R 'stat /etc/noexit/vnc/passwd' "$work/root.raw" 2>/dev/null | grep -q 'User:  1000' || {
    echo "could not write /etc/noexit/vnc/passwd into the root file system" >&2
    exit 1
  }
  root=(-drive "file=$work/root.raw,if=none,id=root,format=raw")
fi
nic=user,model=virtio-net-pci,restrict=on
if [ "$mode" = tigervnc ]; then
  vncport=$((20000 + RANDOM % 20000))
  nic=$nic,hostfwd=tcp:127.0.0.1:$vncport-:5901
fi

start=$(date +%s%N)
qemu-system-x86_64 -machine pc,accel=tcg -m "$mem" -smp "$cpus" -nodefaults -no-user-config -display none \
  -vga std -device virtio-tablet-pci -device virtio-balloon-pci,id=balloon0 \
  -vnc "unix:$work/vnc.sock,password=on" -qmp "unix:$work/qmp.sock,server=on,wait=off" \
  -kernel "$img/vmlinuz" -initrd "$img/initrd.img" -append "console=ttyS0 root=LABEL=noexit-root ro" \
  -serial "file:$out/console.log" \
  "${root[@]}" -device virtio-blk-pci,drive=root,serial=root \
  -drive "file=$work/seed.iso,media=cdrom,if=none,id=seed,readonly=on" -device ide-cd,drive=seed \
  -drive "file=$work/home.qcow2,if=none,id=home,format=qcow2" -device virtio-blk-pci,drive=home,serial=home \
  -nic "$nic" &
qpid=$!
for _ in $(seq 1 100); do [ -S "$work/qmp.sock" ] && break; sleep 0.1; done
# The console password, as libvirt sets <graphics passwd=...>.
screen qmp "$work/qmp.sock" "{\"execute\":\"set_password\",\"arguments\":{\"protocol\":\"vnc\",\"password\":\"$password\"}}" >/dev/null
screen qmp "$work/qmp.sock" '{"execute":"qom-set","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats-polling-interval","value":5}}' >/dev/null
elapsed() { echo $((($(date +%s%N) - start) / 1000000000)); }
# The guest uptime journald stamps a console line with.
uptime_at() { grep -m1 "$1" "$out/console.log" | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p'; }
# Polls the console (QMP screendump) until the picture's JSON has $1, at most $2 s.
await_screen() {
  local until=$(($(elapsed) + $2))
  while [ "$(elapsed)" -lt "$until" ]; do
    kill -0 "$qpid" 2>/dev/null || { echo "qemu exited" >&2; exit 1; }
    shot=$(screen qmp-dump "$work/qmp.sock" "$out/console-last.png")
    grep -q "$1" <<<"$shot" && return 0
    sleep 1
  done
  return 1
}

if [ "$mode" = console ]; then
  await_screen '"desktop": true' "$timeout" || {
    echo "no desktop on the console after $timeout s; last screen: $shot ($out/console-last.png)" >&2
    tail -n 40 "$out/console.log" >&2
    exit 1
  }
  seen=$(elapsed)
  echo "desktop on the console $seen s after starting qemu (screendump: $shot)"
  shot=$(screen vnc "$work/vnc.sock" "$out/desktop-vnc.png" "$password")
  echo "through the VNC console with its password: $shot ($out/desktop-vnc.png)"
  grep -q '"desktop": true' <<<"$shot" || { echo "the VNC console does not show the desktop" >&2; exit 1; }
  if screen vnc "$work/vnc.sock" "$work/wrong.png" "wrong-pw" >/dev/null 2>&1; then
    echo "the VNC console accepted a wrong password" >&2
    exit 1
  fi
  # Input through the VNC console: a click on "Applications" (the virtio tablet) opens the menu,
  # Escape (the PS/2 keyboard) closes it.
  screen vnc-click "$work/vnc.sock" 40 12 "$password"
  await_screen '"menu_open": true' 60 || {
    echo "a click on Applications through the VNC console opened no menu: $shot" >&2
    exit 1
  }
  cp "$out/console-last.png" "$out/menu.png"
  screen vnc-key "$work/vnc.sock" 0xff1b "$password"
  await_screen '"menu_open": false' 60 || { echo "Escape through the VNC console did not close the menu: $shot" >&2; exit 1; }
  echo "through the VNC console, a click opened the applications menu and Escape closed it ($out/menu.png)"
  grep -q "Started noexit-console-desktop" "$out/console.log" || {
    echo "no 'Started noexit-console-desktop' on the serial console" >&2
    exit 1
  }
  if grep -q "Started noexit-desktop.service" "$out/console.log"; then
    echo "TigerVNC (noexit-desktop.service) started too" >&2
    exit 1
  fi
  echo "guest uptime: noexit-boot done at $(uptime_at 'noexit-boot: .* done') s, the console desktop's unit started at $(uptime_at 'Started noexit-console-desktop') s"
  echo "idle $idle s with the desktop ..."
  sleep "$idle"
  stats=$(screen qmp "$work/qmp.sock" '{"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}}')
  python3 - "$stats" <<'EOF'
import json, sys
s = json.loads(sys.argv[1])["stats"]
mib = lambda k: s[k] / 2**20
print(f"guest memory at idle: {mib('stat-total-memory') - mib('stat-available-memory'):.0f} MiB used "
      f"(total {mib('stat-total-memory'):.0f}, available {mib('stat-available-memory'):.0f}, "
      f"free {mib('stat-free-memory'):.0f}, page cache {mib('stat-disk-caches'):.0f})")
EOF
  echo "qemu resident memory: $(awk '/VmRSS/ {print int($2 / 1024) " MiB"}' "/proc/$qpid/status")"
  screen qmp-dump "$work/qmp.sock" "$out/desktop-idle.png" >/dev/null
else
  # TigerVNC answers with the password file's password and shows Xfce; the console does not.
  seen=
  while [ "$(elapsed)" -lt "$timeout" ]; do
    kill -0 "$qpid" 2>/dev/null || { echo "qemu exited" >&2; exit 1; }
    if shot=$(screen vnc "127.0.0.1:$vncport" "$out/tigervnc.png" "$password" 2>/dev/null) &&
      grep -q '"desktop": true' <<<"$shot"; then
      seen=$(elapsed)
      break
    fi
    sleep 3
  done
  [ -n "$seen" ] || {
    echo "TigerVNC showed no desktop on the guest's port 5901 after $timeout s" >&2
    tail -n 40 "$out/console.log" >&2
    exit 1
  }
  echo "TigerVNC desktop (guest :1, port 5901) $seen s after starting qemu: $shot ($out/tigervnc.png)"
  shot=$(screen qmp-dump "$work/qmp.sock" "$out/console-tigervnc.png")
  echo "the console meanwhile: $shot"
  grep -q '"desktop": false' <<<"$shot" || { echo "the console shows a desktop too" >&2; exit 1; }
  grep -q "Started noexit-desktop.service" "$out/console.log" || {
    echo "no 'Started noexit-desktop.service' on the serial console" >&2
    exit 1
  }
  if grep -q "Started noexit-console-desktop" "$out/console.log"; then
    echo "the console desktop started too" >&2
    exit 1
  fi
fi
echo "ok ($mode): screenshots and console.log in $out"
