#!/usr/bin/env bash
# Stage 2 of the guest tier's image: the base root from build-base.sh + a venv with the project's
# dependencies from the wheelhouse -> OUT/{vmlinuz,initrd.img,rootfs.img,versions.txt}, plus the
# bookworm-backports kernel's OUT/{vmlinuz-bpo,initrd-bpo.img} (build-base.sh installs both kernels).
# Like stage 1 it writes only into OUT, which tests/guest/image.py renames into the cache on success.
# Needs root and e2fsprogs (mkfs.ext4 -d: no mount needed). Changing this file changes the cache key.
#
#   build-image.sh BASE WHEELHOUSE OUT
set -euo pipefail

IMAGE_SIZE=6G
VENV=/opt/blockwire/venv

log() { echo "build-image: $*" >&2; }

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

stage_image() {
  local base=$1 wheelhouse=$2 out=$3
  local root=$out/rootfs
  log "copying the base root"
  cp -a "$base/rootfs" "$root"

  log "creating $VENV from the wheelhouse"
  mkdir -p "$root/tmp/wheelhouse"
  cp "$wheelhouse"/*.whl "$root/tmp/wheelhouse/"
  # Everything in the wheelhouse except blockwire itself, which each run installs from the checkout.
  local wheels=()
  for w in "$root"/tmp/wheelhouse/*.whl; do
    case "$(basename "$w")" in blockwire-*) ;; *) wheels+=("/tmp/wheelhouse/$(basename "$w")") ;; esac
  done
  in_root "$root" /usr/bin/python3 -m venv "$VENV"
  in_root "$root" "$VENV/bin/pip" install -q --no-index --no-cache-dir --find-links /tmp/wheelhouse \
    "${wheels[@]}"
  rm -rf "$root/tmp/wheelhouse"
  # Debian's rados/rbd extension modules (python3-rados, python3-rbd; PyPI has none): just those two
  # importable in the venv through a .pth naming a directory of symlinks to them, as scripts/setup does.
  local site
  site=$(in_root "$root" "$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$root$VENV/lib/debian-ceph"
  for so in "$root"/usr/lib/python3/dist-packages/rados.cpython-311-*.so \
    "$root"/usr/lib/python3/dist-packages/rbd.cpython-311-*.so; do
    [ -e "$so" ] && ln -sf "/usr/lib/python3/dist-packages/$(basename "$so")" "$root$VENV/lib/debian-ceph/"
  done
  echo "$VENV/lib/debian-ceph" >"$root$site/blockwire-debian-ceph.pth"

  local default_release backports_release
  default_release=$(sed -n 's/^default=//p' "$root/etc/blockwire-kernels")
  backports_release=$(sed -n 's/^backports=//p' "$root/etc/blockwire-kernels")
  {
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "kernel: $default_release"
    echo "kernel-backports: $backports_release"
    for p in linux-image-amd64 open-iscsi multipath-tools tgt udev libvirt-daemon qemu-system-x86 \
      python3 targetcli-fb python3-rtslib-fb sg3-utils lvm2 nvme-cli; do
      echo "$p: $(in_root "$root" dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo '?')"
    done
    echo "venv:"
    in_root "$root" "$VENV/bin/pip" list --format=freeze 2>/dev/null | sed 's/^/  /'
  } >"$out/versions.txt"

  log "extracting the kernels and initrds ($default_release; backports $backports_release)"
  # By release, not through the /vmlinuz symlinks (those point at the newest: the backports one).
  cp "$root/boot/vmlinuz-$default_release" "$out/vmlinuz"
  cp "$root/boot/initrd.img-$default_release" "$out/initrd.img"
  cp "$root/boot/vmlinuz-$backports_release" "$out/vmlinuz-bpo"
  cp "$root/boot/initrd.img-$backports_release" "$out/initrd-bpo.img"

  log "making rootfs.img ($IMAGE_SIZE)"
  mkfs.ext4 -q -F -L blockwire-guest -d "$root" "$out/rootfs.img" "$IMAGE_SIZE"
  rm -rf "$root"
}

stage_image "$1" "$2" "$3"
