#!/usr/bin/env bash
# Stage 1 of the guest tier's Debian 12 image: debootstrap + configuration -> OUT/rootfs/, with two
# kernels: Debian 12's own (6.1, the one every guest run boots by default) and bookworm-backports' (6.12,
# for what 6.1 is built without: NVMe DH-HMAC-CHAP, CONFIG_NVME_AUTH / CONFIG_NVME_TARGET_AUTH). Their
# releases go to OUT/rootfs/etc/blockwire-kernels ("default=..." and "backports=..."), which
# build-image.sh reads to pick each one's vmlinuz and initrd.
# tests/guest/image.py calls it with an empty directory inside the cache and renames that directory into
# place only when this script succeeds, so a failed build never leaves a half cache. Needs root and
# debootstrap. Everything the base holds is decided here: changing this file changes the cache key.
#
#   build-base.sh MIRROR OUT
set -euo pipefail

SUITE=bookworm
BACKPORTS=$SUITE-backports
# LAB.md's list: the kernel path (open-iscsi, multipath-tools, tgt, LIO via rtslib/targetcli, lvm2) and
# libvirt + QEMU inside the guest (libpam-systemd, or polkitd fails), a throwaway Ceph cluster for krbd
# (tests/ceph.py: mon, OSD and the rbd CLI) and QEMU's librbd (qemu-block-extra, and the rados/rbd
# bindings the agent checks an image's identity with: bench/rbd_guest.py), plus what the tests run with.
PACKAGES=(
  linux-image-amd64 initramfs-tools systemd-sysv udev kmod iproute2
  open-iscsi multipath-tools tgt lvm2 sg3-utils lsscsi libiscsi-bin
  python3 python3-venv python3-rtslib-fb targetcli-fb dbus
  procps util-linux e2fsprogs psmisc thin-provisioning-tools nvme-cli
  libvirt-daemon-system libvirt-daemon-system-systemd libpam-systemd iptables libvirt-clients
  qemu-system-x86 qemu-utils
  ceph-mon ceph-osd ceph-common qemu-block-extra python3-rados python3-rbd
)

log() { echo "build-base: $*" >&2; }

# Runs a command chrooted into $1 with /dev, /proc and /sys in a private mount namespace: the mounts go
# away with the process, even when it fails.
in_root() {
  local root=$1
  shift
  unshare --mount --propagation private -- /bin/sh -ec '
    root=$1; shift
    mount --rbind /dev "$root/dev"
    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
  ' in_root "$root" "$@"
}

stage_base() {
  local mirror=$1 out=$2
  local root=$out/rootfs
  log "debootstrap $SUITE from $mirror"
  local pkgs
  pkgs=$(IFS=,; echo "${PACKAGES[*]}")
  debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$root" "$mirror" >"$out/debootstrap.log" 2>&1 || {
    tail -n 40 "$out/debootstrap.log" >&2
    return 1
  }

  log "adding the $BACKPORTS kernel next to $SUITE's"
  local default_release backports_release
  default_release=$(ls "$root/lib/modules")
  [ "$(echo "$default_release" | wc -l)" -eq 1 ] || {
    echo "build-base: expected one kernel after debootstrap, found: $default_release" >&2
    return 1
  }
  echo "deb $mirror $BACKPORTS main" >"$root/etc/apt/sources.list.d/$BACKPORTS.list"
  # Only the kernel comes from backports (linux-image-amd64/$BACKPORTS: its dependencies that bookworm
  # has stay bookworm's); the 6.1 kernel package stays installed.
  if ! {
    in_root "$root" apt-get update -q &&
      in_root "$root" DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "linux-image-amd64/$BACKPORTS"
  } >"$out/backports-kernel.log" 2>&1; then
    tail -n 40 "$out/backports-kernel.log" >&2
    echo "build-base: could not install linux-image-amd64 from $BACKPORTS on $mirror" >&2
    return 1
  fi
  backports_release=$(ls "$root/lib/modules" | grep -vxF "$default_release" || true)
  [ -n "$backports_release" ] && [ -e "$root/boot/initrd.img-$backports_release" ] || {
    echo "build-base: no $BACKPORTS kernel or initrd in /boot after the install" >&2
    return 1
  }
  printf 'default=%s\nbackports=%s\n' "$default_release" "$backports_release" >"$root/etc/blockwire-kernels"

  log "configuring"
  echo blockwire-guest >"$root/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\tblockwire-guest\n' >"$root/etc/hosts"
  : >"$root/etc/fstab"
  # A fixed initiator name: recordings and ACLs in tests can name it.
  echo "InitiatorName=iqn.1993-08.org.debian:01:blockwire-guest" >"$root/etc/iscsi/initiatorname.iscsi"
  # Multi-line blacklist (a one-line block is silently ignored); find_multipaths no gives a map for
  # every SCSI disk, even with a single path, without the wwids file.
  cat >"$root/etc/multipath.conf" <<'EOF'
defaults {
	user_friendly_names yes
	find_multipaths no
}
blacklist {
	devnode "^(ram|loop|fd|md|sr|scd|st|vd)[0-9a-z]*"
}
EOF
  # libvirt: no default network to start (the guest has none), QEMU domains run as root.
  rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"
  # PID 1 of the guest: mount what the real init script needs and hand over to the checkout's
  # tests/guest/test-init.sh, so that script can change without rebuilding the image.
  cat >"$root/sbin/blockwire-init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# The initramfs has moved /proc, /sys and /dev over already; mount them when it has not.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
modprobe -a 9pnet_virtio 9p
mkdir -p /mnt/src /mnt/results
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 src /mnt/src
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /mnt/results
exec /bin/sh /mnt/src/tests/guest/test-init.sh
EOF
  chmod 0755 "$root/sbin/blockwire-init"
  in_root "$root" apt-get clean
  rm -rf "$root/var/lib/apt/lists/"* "$root/var/log/"*.log
}

stage_base "$1" "$2"
