#!/bin/sh
# The guest's init, run as PID 1 by the image's /sbin/blockwire-init once it has mounted /proc, /sys,
# /dev and the two 9p shares (/mnt/src: the checkout, read-only; /mnt/results: written back to the host).
# It brings up what a compute host has (udevd, D-Bus, iscsid, multipathd, virtlogd + libvirtd), copies
# the checkout to /root/src and installs it into the image's venv, runs pytest over the inside tests (or
# the recorder), writes the exit code to /mnt/results/rc and powers off. tgtd is left to the tests
# (tests/guest/inside/conftest.py): they start, crash and restart it.
# Each step's time since boot goes to the console (the host keeps it as serial.log).
export PATH=/opt/blockwire/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin
R=/mnt/results
# BLOCKWIRE_GUEST_RESULTS: inside tests may leave artifacts there; the host keeps the last runs.
export HOME=/root LANG=C.UTF-8 BLOCKWIRE_IN_GUEST=1 PYTHONUNBUFFERED=1 BLOCKWIRE_GUEST_RESULTS=$R
VENV=/opt/blockwire/venv

step() { echo "test-init: [$(cut -d' ' -f1 /proc/uptime)s] $*"; }
poweroff_now() {
  echo "$1" >"$R/rc"
  step "exit code $1, powering off"
  sync
  echo o >/proc/sysrq-trigger
  sleep 60
}
# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  limit=$1
  shift
  i=0
  while ! "$@" >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -gt $((limit * 10)) ] && return 1
    sleep 0.1
  done
}

step "userspace up"
. "$R/run.env"
# BLOCKWIRE_GUEST_KERNEL: which of the image's kernels this boot is ("default" 6.1, "backports" 6.12);
# tests/guest/inside/conftest.py runs only the tests of this kernel.
export BLOCKWIRE_REQUIRE_TIERS BLOCKWIRE_RECORD BLOCKWIRE_GUEST_KERNEL
step "kernel ${BLOCKWIRE_GUEST_KERNEL:-default}: $(uname -r)"
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm /run/lock /run/dbus /var/run/tgtd
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t configfs configfs /sys/kernel/config 2>/dev/null || true
hostname blockwire-guest
ip link set lo up

step "modprobe"
modprobe -a iscsi_tcp dm_multipath dm_round_robin dm_service_time scsi_dh_alua sd_mod sg configfs \
  target_core_mod iscsi_target_mod target_core_file target_core_iblock loop
# NVMe/TCP: the initiator (nvme-tcp, nvme-fabrics; native multipath is nvme_core's default) and the
# kernel target (nvmet, nvmet-tcp; configured through /sys/kernel/config/nvmet). nvme-cli is in the image.
modprobe -a nvme_fabrics nvme_tcp nvmet nvmet_tcp || step "NVMe/TCP modules missing"
mountpoint -q /sys/kernel/config || mount -t configfs configfs /sys/kernel/config

step "udevd"
/lib/systemd/systemd-udevd --daemon
udevadm trigger --action=add --type=subsystems
udevadm trigger --action=add --type=devices
udevadm settle --timeout=60 || step "udevadm settle timed out"

step "dbus, iscsid, multipathd, virtlogd, libvirtd"
dbus-daemon --system --fork
iscsid
multipathd
virtlogd -d
libvirtd -d
wait_for 30 multipathd show daemon || step "multipathd does not answer"

step "checkout -> /root/src"
mkdir -p /root/src
(cd /mnt/src && tar -cf - --exclude=./.git --exclude=./.venv --exclude='*/__pycache__' \
  --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache --exclude=./build .) |
  tar -xf - -C /root/src
cd /root/src || poweroff_now 3
step "checkout on the venv path"
# .pth files put the checkout on the venv's path (what an editable install does, without a build).
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '/root/src/clients\n/root/src\n' >"$site/blockwire-checkout.pth"

if [ "${BLOCKWIRE_RECORD:-0}" = 1 ]; then
  step "recording tool output"
  mkdir -p "$R/recorded"
  (python tests/guest/inside/record_outputs.py "$R/recorded"; echo $? >/tmp/rc) 2>&1 | tee "$R/record.log"
else
  step "pytest $BLOCKWIRE_INSIDE_FILES"
  # shellcheck disable=SC2086
  (python -m pytest $BLOCKWIRE_INSIDE_FILES -p no:cacheprovider -o junit_family=xunit1 --continue-on-collection-errors \
    --junitxml="$R/junit.xml" -ra -v --timeout="$BLOCKWIRE_INSIDE_TEST_TIMEOUT"; echo $? >/tmp/rc) 2>&1 |
    tee "$R/pytest.log"
fi
rc=$(cat /tmp/rc 2>/dev/null || echo 99)
dmesg >"$R/dmesg.txt" 2>&1
poweroff_now "$rc"
