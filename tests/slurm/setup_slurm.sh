#!/usr/bin/env bash
# Install Debian's slurm-wlm and munge if missing, then start munged, slurmctld and a slurmd named
# "localhost" with a one-node, one-partition config. Root, no systemd, no cgroups, no accounting.
# Idempotent: daemons already answering are left running. Prints nothing on success but a summary.
#   bash tests/slurm/setup_slurm.sh        (state, logs and config under $SLURM_TEST_STATE)
set -euo pipefail

STATE=${SLURM_TEST_STATE:-/tmp/muon-ds-slurm}
CONF=/etc/slurm/slurm.conf
die() { echo "setup_slurm.sh: error: $*" >&2; exit 2; }

[[ $(id -u) -eq 0 ]] || die "must run as root (apt-get, munged, slurmd)"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get to install them (Debian/Ubuntu only)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: its key readable only by munge; every directory above the socket mode 755.
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 755 /run /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile /etc/munge/munge.key
fi
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 700 /etc/munge && chmod 600 /etc/munge/munge.key
if ! munge -n >/dev/null 2>&1; then
    runuser -u munge -- munged
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
fi

mkdir -p "$STATE/ctld" "$STATE/spool" /etc/slurm
cat > "$STATE/slurm.conf.new" <<CONF
# One-node Slurm for muon-ds tests (written by tests/slurm/setup_slurm.sh).
ClusterName=muonds
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire+1 s after it ended (default 120): shorter for tests.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait=60
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
NodeName=localhost NodeHostname=$(hostname) CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$STATE/slurm.conf.new" "$CONF"; then
    # A different config: stop daemons started with the old one (scontrol shutdown stops both).
    if scontrol ping 2>/dev/null | grep -q UP; then
        scontrol shutdown >/dev/null 2>&1 || true
        for _ in $(seq 100); do pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null || break; sleep 0.2; done
    fi
    mv "$STATE/slurm.conf.new" "$CONF"
fi

if ! scontrol ping 2>/dev/null | grep -q UP; then
    slurmctld
fi
if ! pgrep -x slurmd >/dev/null; then
    slurmd -N localhost
fi
for _ in $(seq 100); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
        echo "slurm up: $(sinfo -h -o '%P %D %T %c' | head -1) (state and logs in $STATE)"
        exit 0
    fi
    sleep 0.2
done
die "the node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log"
