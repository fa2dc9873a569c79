#!/bin/sh
# /init of the Palisade QEMU guest (built by `cargo xtask guest`). The kernel runs it as PID 1
# from the initramfs; it prepares the filesystems the agent needs, runs every guest test binary
# and reports each result on the serial console, where xtask reads it.
export PATH=/bin HOME=/root TERM=dumb PALISADE_GUEST=1 PALISADE_BIN=/bin/palisade RUST_BACKTRACE=1

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t securityfs securityfs /sys/kernel/security
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
echo "PALISADE-GUEST-BOOTED $(cut -d' ' -f1 /proc/uptime)s kernel $(uname -r) lsm=$(cat /sys/kernel/security/lsm)"

result() {
    echo "PALISADE-GUEST-RESULT $1 $2"
}

# Self-check: proves the harness itself (kernel booted with BPF-LSM active, and the agent
# binary runs with the libraries copied from the host).
grep -qw bpf /sys/kernel/security/lsm
result selfcheck-bpf-lsm $?
/bin/palisade --help >/dev/null
result selfcheck-palisade-runs $?

args=$(cat /etc/palisade/test-args 2>/dev/null)
for t in $(cat /etc/palisade/guest-tests); do
    echo "PALISADE-GUEST-START $t"
    # shellcheck disable=SC2086 # args are split on purpose
    /bin/"$t" --test-threads=1 --include-ignored $args
    result "$t" $?
done
echo PALISADE-GUEST-DONE

if grep -qw palisade.keep /proc/cmdline; then
    echo "palisade.keep: guest shell; 'poweroff -f' to leave"
    setsid sh -c 'exec sh </dev/ttyS0 >/dev/ttyS0 2>&1'
fi
poweroff -f
