#!/usr/bin/env bash
# Builds the VM workspace image: Debian 12 + R + Xfce/TigerVNC + noexit-agent, as a qcow2 disk.
# Usage: sudo images/vm/build.sh OUT_DIR [AGENT_BINARY]
set -euo pipefail
out=${1:?usage: build.sh OUT_DIR [AGENT_BINARY]}
agent=${2:-target/release/noexit-agent}
here=$(cd "$(dirname "$0")" && pwd)
[ "$(id -u)" -eq 0 ] || { echo "build.sh: needs root (debootstrap, mount)" >&2; exit 1; }
[ -x "$agent" ] || { echo "build.sh: build the agent first: cargo build --release -p noexit-agent" >&2; exit 1; }
mkdir -p "$out"
work=$(mktemp -d)
trap 'umount -R "$work/root" 2>/dev/null || true; rm -rf "$work"' EXIT

debootstrap --variant=minbase --include=systemd-sysv,linux-image-amd64,grub-pc,cloud-init,nftables,r-base,xfce4,tigervnc-standalone-server,dbus-x11 \
  bookworm "$work/root" http://deb.debian.org/debian

install -m 0755 "$agent" "$work/root/usr/local/bin/noexit-agent"
install -m 0644 "$here/noexit-agent.service" "$work/root/etc/systemd/system/noexit-agent.service"
install -m 0644 "$here/noexit-desktop.service" "$work/root/etc/systemd/system/noexit-desktop.service"
install -m 0755 "$here/../r-desktop/start-desktop" "$work/root/usr/local/bin/start-desktop"
install -m 0644 "$here/usb-storage.conf" "$work/root/etc/modprobe.d/noexit-usb-storage.conf"
install -m 0644 "$here/../r-desktop/Rprofile.site" "$work/root/etc/R/Rprofile.site"
mkdir -p "$work/root/etc/tigervnc"
install -m 0644 "$here/../r-desktop/vnc.conf" "$work/root/etc/tigervnc/vncserver-config-mandatory"
chroot "$work/root" useradd --uid 1000 --create-home --home-dir /home/researcher researcher
chroot "$work/root" systemctl enable noexit-agent.service
# No remote shells, no automount of removable media.
chroot "$work/root" sh -c 'apt-get purge -y openssh-server udisks2 2>/dev/null || true'

img="$out/r-desktop-vm.raw"
qemu-img create -f raw "$img" 8G
parted -s "$img" mklabel msdos mkpart primary ext4 1MiB 100% set 1 boot on
loop=$(losetup --find --show --partscan "$img")
mkfs.ext4 -q "${loop}p1"
mkdir -p "$work/mnt" && mount "${loop}p1" "$work/mnt"
cp -a "$work/root/." "$work/mnt/"
for fs in dev proc sys; do mount --bind "/$fs" "$work/mnt/$fs"; done
chroot "$work/mnt" grub-install --target=i386-pc "$loop"
chroot "$work/mnt" update-grub
umount -R "$work/mnt"; losetup -d "$loop"
qemu-img convert -O qcow2 -c "$img" "$out/r-desktop-vm.qcow2" && rm -f "$img"
echo "built $out/r-desktop-vm.qcow2"
