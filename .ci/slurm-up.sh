#!/usr/bin/env bash
# A one-node Slurm cluster on localhost (munge + slurmctld + slurmd, all as root), for tests/test_slurm.py.
#
#   sudo .ci/slurm-up.sh          # install (Debian/Ubuntu: slurm-wlm, munge), configure, start; idempotent
#   sudo .ci/slurm-up.sh --down   # stop the daemons this script started
#
# Works in a container without systemd or cgroups: processes are tracked by /proc (proctrack/linuxproc)
# and tasks are not bound (task/none). The node's CPUs are this machine's `nproc`; memory is not a
# consumable resource (CR_Core), so jobs need no --mem. No accounting daemon: finished jobs are kept in
# slurmctld's memory for MinJobAge seconds, so `scontrol show job` (not sacct) reports their final state.
# It refuses to overwrite a slurm.conf it did not write: on a machine with a real cluster, use that one.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by unimodality .ci/slurm-up.sh"
SPOOL=/var/spool/slurm-local
LOGS=/var/log/slurm-local

die() { echo "slurm-up: $*" >&2; exit 1; }
[[ $EUID -eq 0 ]] || die "run as root (slurmd must start job processes as the submitting user)"

if [[ ${1:-} == --down ]]; then
    for daemon in slurmd slurmctld munged; do
        # only the daemons started from our pid files: never anything else of that name
        pidfile="/run/slurm-local/$daemon.pid"
        [[ $daemon == munged ]] && pidfile=/run/munge/munged.pid
        if [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null; then echo "stopped $daemon"; fi
    done
    exit 0
fi

# --- packages -------------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- munge (authentication between the Slurm commands and daemons) ----------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
fi

# --- slurm.conf -----------------------------------------------------------------------------------------
if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script: not touching a real cluster's configuration"
fi
CPUS=$(nproc)
install -d -m 0755 /etc/slurm "$SPOOL/ctld" "$SPOOL/d" "$LOGS" /run/slurm-local
cat >"$CONF.new" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=/run/slurm-local/slurmctld.pid
SlurmdPidFile=/run/slurm-local/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# no systemd/cgroups in a container: track processes through /proc, don't bind tasks
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# a down node (e.g. after a restart) comes back by itself
ReturnToService=2
# seconds between SIGTERM and SIGKILL when a job is cancelled or requeued (Slurm's default: 30)
KillWait=5
# finished jobs stay visible to "scontrol show job" for 10 minutes
MinJobAge=600
# a requeued job may start again after the job credential's lifetime (Slurm's default: 120 s)
AuthInfo=cred_expire=10
# schedule pending jobs within seconds, not the default minute (main) and 30 s (backfill)
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1024 State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
    mv "$CONF.new" "$CONF"
    changed=1
else
    rm "$CONF.new"
    changed=0
fi

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --- daemons --------------------------------------------------------------------------------------------
if [[ $changed == 1 ]]; then
    # a new configuration: restart (some settings, e.g. AuthInfo, are not re-read by "scontrol reconfigure");
    # jobs survive in StateSaveLocation
    for pidfile in /run/slurm-local/slurmd.pid /run/slurm-local/slurmctld.pid; do
        if running "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
fi
running /run/slurm-local/slurmctld.pid || slurmctld
running /run/slurm-local/slurmd.pid || slurmd -N localhost

# wait until the controller answers and the node takes jobs
for _ in $(seq 100); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case $state in idle*|mixed*|allocated*) break ;; esac
    sleep 0.2
done
case ${state:-} in
    idle*|mixed*|allocated*) ;;
    down*|drain*)
        scontrol update nodename=localhost state=resume
        sleep 1
        state=$(sinfo -h -n localhost -o %T) ;;
    *) die "node not up (state '${state:-none}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log" ;;
esac
echo "slurm-up: one-node cluster ready: partition local, node localhost, $CPUS CPUs (state ${state})"
