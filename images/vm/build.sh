#!/usr/bin/env bash
# Builds noexit's VM images from Debian packages only (bookworm, by mmdebstrap from the Debian
# archive; nothing else is downloaded) into a cache directory outside the repository, and prints
# that directory on stdout (logs go to stderr). A second run with the same inputs reuses it.
#   images/vm/build.sh tiny       # TEST image: vmlinux (or vmlinuz) + initrd.img (agent, nft, busybox,
#                                 # mkfs.ext4, virtio/ext4/iso9660/nftables modules) and a root
#                                 # shell on ttyS1 when booted with noexit.test=1
#   images/vm/build.sh workspace  # the workspace disk: workspace.qcow2 (Debian 12, agent, nftables,
#                                 # R, Xfce on TigerVNC (KubeVirt) or on Xorg on the VM's own display
#                                 # (single-host); no SSH, no spice agent, USB storage off)
#                                 # with vmlinuz + initrd.img beside it for direct kernel boot
# Both follow the boot contract in images/README.md (the seed ISO NOEXITSEED, disks by serial).
# Inputs: AGENT (the noexit-agent binary; default target/debug/noexit-agent of this repository),
#         NOEXIT_CACHE (default ~/.cache/noexit), NOEXIT_DEBIAN_MIRROR (default
#         http://deb.debian.org/debian). The cache key hashes this directory's files, the agent
#         binary and those settings; the archive's contents are not part of it (delete the
#         directory, or set NOEXIT_VM_REBUILD=1, to pick up Debian updates).
# Needs: mmdebstrap, kmod (modprobe/depmod), cpio, zstd, binutils (strip); for `workspace` also
#        root (mmdebstrap installs in a chroot), qemu-utils and e2fsprogs; no loop devices, no
#        mounts (mkfs.ext4 -d fills the file system from the tree).
#   DIR=$(images/vm/build.sh tiny) && ls "$DIR"   # info.txt  initrd.img  vmlinux  vmlinuz
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
kind=${1:-}
case $kind in
tiny | workspace) ;;
*)
  echo "usage: images/vm/build.sh tiny|workspace   (prints the output directory)" >&2
  exit 2
  ;;
esac
agent=${AGENT:-$repo/target/debug/noexit-agent}
[ -x "$agent" ] || {
  echo "vm/build: no agent binary at $agent: build it (cargo build -p noexit-agent) or set AGENT" >&2
  exit 1
}
mirror=${NOEXIT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
for tool in mmdebstrap modprobe depmod cpio zstd xz strip; do
  command -v "$tool" >/dev/null || {
    echo "vm/build: $tool is not installed (hack/install-deps.sh installs it)" >&2
    exit 1
  }
done

# Bump when the steps below change what they produce.
BUILD_ID=1
hash=$(
  {
    echo "$BUILD_ID $kind $suite $mirror"
    cd "$here" && find build.sh guest "$kind" -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum <"$agent"
  } | sha256sum | cut -c1-16
)
cache=${NOEXIT_CACHE:-$HOME/.cache/noexit}/vm
out=$cache/$kind-$hash
mkdir -p "$cache"
# One build per output at a time (parallel tests wait for the first).
exec 9>"$cache/.$kind-$hash.lock"
flock 9
if [ -f "$out/info.txt" ] && [ -z "${NOEXIT_VM_REBUILD:-}" ]; then
  echo "$out"
  exit 0
fi
start=$SECONDS
work=$(mktemp -d "$cache/.build-$kind.XXXXXX")
trap 'rm -rf "$work"' EXIT
log() { echo "vm/build: $*" >&2; }

# Guest packages, unpacked (not installed): the files are all the tiny image needs.
extract() {
  log "mmdebstrap $suite (extract): $1"
  mmdebstrap --quiet --variant=extract --include="$1" "$suite" "$work/deb" "$mirror" >&2
}

# The guest's shared libraries a binary of the extracted tree needs, resolved by the guest's own
# dynamic loader against the guest's libraries (so an agent built against a newer glibc than
# bookworm's is refused here, not at boot).
libs_of() {
  local deb=$work/deb listing
  listing=$("$deb/lib64/ld-linux-x86-64.so.2" --library-path "$deb/lib/x86_64-linux-gnu:$deb/usr/lib/x86_64-linux-gnu" \
    --list "$1" 2>&1) || {
    echo "vm/build: $1 does not load with the guest's ($suite) libraries:" >&2
    echo "$listing" >&2
    exit 1
  }
  if grep -q "not found" <<<"$listing"; then
    echo "vm/build: $1 needs libraries $suite does not have:" >&2
    echo "$listing" >&2
    exit 1
  fi
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$listing" | sed "s|^$deb||"
}

# copy_in SRC DEST: a file into the initramfs tree at DEST (symlinks followed), with its libraries.
copy_in() {
  local src=$1 dest=$2 lib
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
  for lib in $(libs_of "$src"); do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$work/deb$lib" "$root$lib"
  done
}

# Modules the guest loads at boot, with their dependencies (resolved here, loaded in this order).
#   virtio (PCI, disks, network, entropy); the seed CD-ROM on SATA, IDE or virtio-scsi;
#   ext4 (home, datasets), iso9660 (seed, datasets);
#   nftables as the agent's egress table uses it (agent/src/egress/plan.rs: inet table, ct mark,
#   named counters (objref), limit, log, reject).
TINY_MODULES=(virtio_pci virtio_blk virtio_net virtio_scsi virtio-rng
  ahci ata_piix sr_mod
  crc32c_generic ext4 isofs
  nf_tables nft_ct nft_objref nft_limit nft_log nf_log_syslog nft_reject_inet)

build_tiny() {
  extract linux-image-amd64,busybox-static,nftables,e2fsprogs
  local deb=$work/deb kver ko
  kver=$(ls "$deb/lib/modules")
  root=$work/initramfs
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,usr/lib/noexit,etc/noexit,proc,sys,dev,run,tmp,var,root,home,data}

  # busybox: the shell and the small tools (ip, udhcpc, mount, blockdev, insmod, ...)
  cp "$deb/bin/busybox" "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  # nft (and libnftables), mkfs.ext4 (and mke2fs.conf)
  copy_in "$deb/usr/sbin/nft" /usr/sbin/nft
  copy_in "$deb/sbin/mke2fs" /sbin/mke2fs
  ln -s mke2fs "$root/sbin/mkfs.ext4"
  cp "$deb/etc/mke2fs.conf" "$root/etc/mke2fs.conf"
  # the agent, without debug info and symbols (a third of a debug build's size), with its libraries
  strip --strip-all -o "$work/noexit-agent" "$agent"
  copy_in "$work/noexit-agent" /usr/local/bin/noexit-agent

  # kernel modules
  depmod -b "$deb" "$kver"
  : >"$root/etc/noexit/modules"
  for m in "${TINY_MODULES[@]}"; do
    modprobe -d "$deb" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
  done | awk '!seen[$0]++' | while read -r ko; do
    ko=${ko#"$deb"}
    mkdir -p "$root$(dirname "$ko")"
    cp "$deb$ko" "$root$ko"
    echo "$ko" >>"$root/etc/noexit/modules"
  done
  cp "$deb/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/"
  depmod -b "$root" "$kver"
  # The kernel runs /sbin/modprobe to load what a request needs (e.g. an nft expression).
  ln -s ../bin/busybox "$root/sbin/modprobe"

  # the boot contract and PID 1
  install -m 0755 "$here/guest/noexit-boot" "$root/usr/lib/noexit/noexit-boot"
  install -m 0755 "$here/guest/udhcpc.script" "$root/usr/lib/noexit/udhcpc.script"
  ln -s ../lib/noexit/noexit-boot "$root/usr/sbin/noexit-boot"
  install -m 0755 "$here/tiny/init" "$root/init"
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'researcher:x:1000:1000:researcher:/home/researcher:/bin/sh' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'researcher:x:1000:' >"$root/etc/group"
  printf '%s\n' '127.0.0.1 localhost' '::1 localhost' >"$root/etc/hosts"
  printf '%s\n' 'hosts: files dns' >"$root/etc/nsswitch.conf"
  printf '%s\n' /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu >"$root/etc/ld.so.conf"
  ldconfig -r "$root"
  : >"$root/etc/resolv.conf"

  mkdir -p "$work/out"
  cp "$deb/boot/vmlinuz-$kver" "$work/out/vmlinuz"
  # The same kernel unpacked: an ELF with a PVH entry point, which QEMU (and libvirt's <kernel>)
  # boots without the bzImage's own decompression, ~10 s of a TCG boot on a busy machine.
  local xz_at
  xz_at=$(LC_ALL=C grep -abo $'\xfd7zXZ\x00' "$work/out/vmlinuz" | head -n 1 | cut -d: -f1)
  [ -n "$xz_at" ] || { echo "vm/build: vmlinuz-$kver is not an xz-compressed bzImage" >&2; exit 1; }
  tail -c +$((xz_at + 1)) "$work/out/vmlinuz" | xz -dc >"$work/out/vmlinux" 2>/dev/null || true
  [ "$(head -c 4 "$work/out/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ] || {
    echo "vm/build: could not unpack vmlinux from vmlinuz-$kver" >&2
    exit 1
  }
  (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | zstd -q -10 -T0 >"$work/out/initrd.img"
  {
    echo "kind: tiny (TEST image: root shell on ttyS1 with noexit.test=1)"
    echo "suite: $suite"
    echo "kernel: $kver"
    echo "agent: $agent ($(sha256sum <"$agent" | cut -c1-16))"
    echo "modules: ${TINY_MODULES[*]}"
    echo "kernel files: vmlinux (PVH ELF, boots faster) or vmlinuz (the same kernel, compressed)"
    echo "cmdline: console=ttyS0 noexit.test=1"
  } >"$work/out/info.txt"
}

build_workspace() {
  [ "$(id -u)" -eq 0 ] || {
    echo "vm/build: the workspace image needs root (mmdebstrap installs packages in a chroot)" >&2
    exit 1
  }
  for tool in qemu-img mkfs.ext4; do
    command -v "$tool" >/dev/null || {
      echo "vm/build: $tool is not installed (hack/install-deps.sh installs it)" >&2
      exit 1
    }
  done
  local rootfs=$work/rootfs kver
  # No openssh, no spice agent, no udisks (automount), no recommends.
  local pkgs=systemd-sysv,udev,kmod,linux-image-amd64,initramfs-tools,nftables,udhcpc,e2fsprogs,util-linux,iproute2
  pkgs=$pkgs,ca-certificates,r-base-core,tigervnc-standalone-server,tigervnc-tools,xfce4-session,xfwm4,xfce4-panel
  pkgs=$pkgs,xfdesktop4,xfce4-terminal,thunar,dbus-x11,fonts-dejavu-core,locales
  # The console desktop (single-host mode): Xorg with its built-in modesetting driver, libinput
  # for the PS/2 keyboard and the virtio tablet, xinit, and logind sessions for rootless Xorg.
  pkgs=$pkgs,xserver-xorg-core,xserver-xorg-input-libinput,xinit,libpam-systemd
  log "mmdebstrap $suite (install): $pkgs"
  mmdebstrap --quiet --variant=apt --include="$pkgs" "$suite" "$rootfs" "$mirror" >&2
  install -m 0755 -D "$here/guest/noexit-boot" "$rootfs/usr/lib/noexit/noexit-boot"
  install -m 0755 -D "$here/guest/udhcpc.script" "$rootfs/usr/lib/noexit/udhcpc.script"
  strip --strip-debug -o "$rootfs/usr/local/bin/noexit-agent" "$agent"
  chmod 0755 "$rootfs/usr/local/bin/noexit-agent"
  install -m 0644 "$here/workspace/noexit-boot.service" "$rootfs/etc/systemd/system/noexit-boot.service"
  install -m 0644 "$here/workspace/noexit-agent.service" "$rootfs/etc/systemd/system/noexit-agent.service"
  install -m 0644 "$here/workspace/usb-storage.conf" "$rootfs/etc/modprobe.d/noexit-usb-storage.conf"
  # The desktop (TigerVNC with VNC authentication); it starts only where its password file was
  # delivered (/etc/noexit/vnc/passwd; see the unit).
  install -m 0644 "$here/workspace/noexit-desktop.service" "$rootfs/etc/systemd/system/noexit-desktop.service"
  install -m 0755 "$here/../r-desktop/start-desktop" "$rootfs/usr/local/bin/start-desktop"
  # Or, without that file (single-host mode), Xorg + Xfce on the VM's own display, which the host
  # shows through QEMU's VNC console (see the unit). Exactly one of the two starts.
  install -m 0644 "$here/workspace/noexit-console-desktop.service" "$rootfs/etc/systemd/system/noexit-console-desktop.service"
  install -m 0644 "$here/workspace/pam-noexit-desktop" "$rootfs/etc/pam.d/noexit-desktop"
  install -m 0644 "$here/workspace/xorg-noexit.conf" -D "$rootfs/etc/X11/xorg.conf.d/10-noexit.conf"
  install -m 0644 "$here/workspace/journald-console.conf" -D "$rootfs/etc/systemd/journald.conf.d/noexit-console.conf"
  install -m 0644 "$here/../r-desktop/Rprofile.site" "$rootfs/etc/R/Rprofile.site"
  install -m 0644 "$here/../r-desktop/vnc.conf" -D "$rootfs/etc/tigervnc/vncserver-config-mandatory"
  chroot "$rootfs" useradd --uid 1000 --user-group --no-create-home --home-dir /home/researcher --shell /bin/bash researcher
  chroot "$rootfs" systemctl enable noexit-boot.service noexit-agent.service noexit-desktop.service noexit-console-desktop.service >&2
  # Nothing listens or configures the network but noexit-boot.
  chroot "$rootfs" systemctl mask systemd-networkd.service serial-getty@ttyS0.service getty@tty1.service >&2 || true
  echo noexit-workspace >"$rootfs/etc/hostname"
  printf '%s\n' '127.0.0.1 localhost noexit-workspace' '::1 localhost' >"$rootfs/etc/hosts"
  # fstab: the root only; home and datasets are mounted by noexit-boot.
  echo 'LABEL=noexit-root / ext4 defaults,errors=remount-ro 0 1' >"$rootfs/etc/fstab"
  kver=$(ls "$rootfs/lib/modules")
  mkdir -p "$work/out"
  cp "$rootfs/boot/vmlinuz-$kver" "$work/out/vmlinuz"
  cp "$rootfs/boot/initrd.img-$kver" "$work/out/initrd.img"
  rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*

  # The disk: one ext4 file system over the whole disk, filled from the tree (mkfs.ext4 -d: no
  # loop device, no mount, no boot loader), booted by the host's direct kernel boot with
  # vmlinuz/initrd.img beside it and root=LABEL=noexit-root.
  local size_mb disk=$work/disk.raw
  size_mb=$(($(du -sm "$rootfs" | cut -f1) * 13 / 10 + 1024))
  log "ext4 root file system, $size_mb MiB"
  mkfs.ext4 -q -L noexit-root -d "$rootfs" "$disk" "${size_mb}M"
  qemu-img convert -c -O qcow2 "$disk" "$work/out/workspace.qcow2"
  {
    echo "kind: workspace"
    echo "suite: $suite"
    echo "kernel: $kver"
    echo "agent: $agent ($(sha256sum <"$agent" | cut -c1-16))"
    echo "packages: $pkgs"
    echo "cmdline: console=ttyS0 root=LABEL=noexit-root ro"
  } >"$work/out/info.txt"
}

"build_$kind"
rm -rf "$out"
mv "$work/out" "$out"
log "$kind built in $((SECONDS - start)) s: $(du -sh "$out" | cut -f1) in $out"
echo "$out"
