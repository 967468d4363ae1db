#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine, for the SLURM integration test
# (tests/test_slurm.py) and for trying profiles/slurm by hand. Debian 12, as root, no systemd.
#
#   tests/slurm/start_cluster.sh DIR      # e.g. /tmp/slurm-test
#   tests/slurm/stop_cluster.sh DIR
#
# Installs slurmctld, slurmd, slurm-client and munge with apt-get when missing, writes
# DIR/etc/slurm.conf and gres.conf for one node "localhost" with N fake GPUs
# (/dev/fakegpuN character devices) and links /etc/slurm/{slurm,gres}.conf to them, starts
# munged, slurmctld and slurmd by hand and waits until sinfo shows the node idle.
# Idempotent: a cluster already running from the same DIR with the same settings is left as
# it is; otherwise its daemons are restarted. Refuses to touch an /etc/slurm/slurm.conf that
# it did not write (a real cluster's).
#
# Environment: SLURM_TEST_GPUS (default 4), SLURM_TEST_GPU_MODEL (default "fake"),
# SLURM_TEST_PARTITION (default "debug"), SLURM_TEST_MIN_JOB_AGE (seconds a finished job stays
# visible to squeue/scontrol, default 600), SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT
# (default 6817 / 6818), SLURM_TEST_TIMEOUT (seconds to wait for the node, default 60).
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 STATE_DIR" >&2
    exit 2
fi
mkdir -p "$1"
DIR=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "$0")" && pwd)

GPUS=${SLURM_TEST_GPUS:-4}
GPU_MODEL=${SLURM_TEST_GPU_MODEL:-fake}
PARTITION=${SLURM_TEST_PARTITION:-debug}
MIN_JOB_AGE=${SLURM_TEST_MIN_JOB_AGE:-600}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-6817}
SLURMD_PORT=${SLURM_TEST_SLURMD_PORT:-6818}
TIMEOUT=${SLURM_TEST_TIMEOUT:-60}
MARK="# Written by tests/slurm/start_cluster.sh"

die() {
    echo "start_cluster: $*" >&2
    exit 1
}
log() { echo "start_cluster: $*"; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"

# --- packages ---------------------------------------------------------------------------
need=()
for pair in slurmctld:/usr/sbin/slurmctld slurmd:/usr/sbin/slurmd \
    slurm-client:/usr/bin/sinfo munge:/usr/sbin/munged; do
    [[ -x ${pair#*:} ]] || need+=("${pair%%:*}")
done
if ((${#need[@]})); then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
    log "installing ${need[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$DIR/apt.log" 2>&1 ||
        { tail -n 20 "$DIR/apt.log" >&2; die "apt-get update failed"; }
    apt-get install -y -qq --no-install-recommends "${need[@]}" >>"$DIR/apt.log" 2>&1 ||
        { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install ${need[*]} failed"; }
fi

# --- where the configuration goes -------------------------------------------------------
# The files live in DIR/etc and /etc/slurm/{slurm,gres}.conf link to them: SLURM_CONF alone
# is not enough, the executor plugin's job step drops SLURM_* variables before it calls srun.
for f in slurm.conf gres.conf; do
    if [[ -e /etc/slurm/$f && ! -L /etc/slurm/$f ]] && ! head -n 1 "/etc/slurm/$f" | grep -qF "$MARK"; then
        die "/etc/slurm/$f exists and was not written by this script: not touching a real cluster's configuration"
    fi
done
linked=$(readlink /etc/slurm/slurm.conf 2>/dev/null || true)
if [[ -n $linked && $linked != "$DIR/etc/slurm.conf" ]]; then
    other=$(dirname "$(dirname "$linked")")
    if alive "$other/run/slurmctld.pid" || alive "$other/run/slurmd.pid"; then
        die "a test cluster from $other is running: stop it first ($HERE/stop_cluster.sh $other)"
    fi
fi

# --- munge ------------------------------------------------------------------------------
# The system munged (default socket, which slurm uses); started here only when not running.
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    # Ours to stop: stop_cluster.sh stops munged only when this file names it.
    cp /run/munge/munged.pid "$DIR/munged.pid.ours" 2>/dev/null || true
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- fake GPUs --------------------------------------------------------------------------
# gres/gpu needs a File= per GPU; character devices (1,3) like /dev/null do the job.
for ((i = 0; i < GPUS; i++)); do
    dev=/dev/fakegpu$i
    [[ -e $dev ]] || mknod "$dev" c 1 3 || touch "$dev"
done

# --- configuration ----------------------------------------------------------------------
mkdir -p "$DIR/etc" "$DIR/state/ctld" "$DIR/state/d" "$DIR/run" "$DIR/log"
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
HOST=$(hostname -s)
DEVS="/dev/fakegpu0"
((GPUS > 1)) && DEVS="/dev/fakegpu[0-$((GPUS - 1))]"

new_conf=$(
    cat <<EOF
$MARK ($DIR): one node, $GPUS fake GPUs.
ClusterName=llavareid
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
# No slurmdbd: sacct has nothing, job status comes from squeue.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MailProg=/bin/true
SlurmdParameters=config_overrides
# Finished jobs stay visible to squeue/scontrol this long: the executor plugin's squeue status
# needs at least 3 x slurm-init-seconds-before-status-checks, the test reads job records.
MinJobAge=$MIN_JOB_AGE
# Without it a job takes all the node's memory.
DefMemPerCPU=1000
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$GPU_MODEL:$GPUS State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)
# Count-only GPUs are dropped (the node goes invalid): every GPU needs a File=.
new_gres="$MARK ($DIR)
AutoDetect=off
NodeName=localhost Name=gpu Type=$GPU_MODEL File=$DEVS"

echo "export SLURM_CONF=$DIR/etc/slurm.conf" >"$DIR/env.sh"
export SLURM_CONF=$DIR/etc/slurm.conf

if [[ -f $DIR/etc/slurm.conf && "$(cat "$DIR/etc/slurm.conf")" == "$new_conf" &&
    -f $DIR/etc/gres.conf && "$(cat "$DIR/etc/gres.conf")" == "$new_gres" &&
    $(readlink /etc/slurm/slurm.conf 2>/dev/null) == "$DIR/etc/slurm.conf" &&
    $(readlink /etc/slurm/gres.conf 2>/dev/null) == "$DIR/etc/gres.conf" ]] &&
    alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid"; then
    log "already running from $DIR"
else
    # Changed settings (GPUs, ports...) need fresh daemons: scontrol reconfigure is not enough.
    bash "$HERE/stop_cluster.sh" "$DIR" --keep-munge >/dev/null
    printf '%s\n' "$new_conf" >"$DIR/etc/slurm.conf"
    printf '%s\n' "$new_gres" >"$DIR/etc/gres.conf"
    mkdir -p /etc/slurm
    ln -sfn "$DIR/etc/slurm.conf" /etc/slurm/slurm.conf
    ln -sfn "$DIR/etc/gres.conf" /etc/slurm/gres.conf
    : >"$DIR/log/slurmctld.log"
    : >"$DIR/log/slurmd.log"
    log "starting slurmctld and slurmd ($CPUS CPUs, ${MEM_MB} MB, gpu:$GPU_MODEL:$GPUS)"
    # -c: start without old jobs. Both fork into the background and write their pid files.
    /usr/sbin/slurmctld -c -f "$SLURM_CONF" >>"$DIR/log/slurmctld.log" 2>&1 ||
        { tail -n 30 "$DIR/log/slurmctld.log" >&2; die "slurmctld did not start"; }
    /usr/sbin/slurmd -N localhost -f "$SLURM_CONF" >>"$DIR/log/slurmd.log" 2>&1 ||
        { tail -n 30 "$DIR/log/slurmd.log" >&2; die "slurmd did not start"; }
fi

# --- wait for the node ------------------------------------------------------------------
started=$SECONDS
deadline=$((SECONDS + TIMEOUT))
state=""
while ((SECONDS < deadline)); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null | head -n 1 || true)
    if [[ $state == idle || $state == mixed || $state == allocated ]]; then
        log "node localhost is $state; partition $PARTITION; SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    # A daemon that died (bad configuration, port in use) will not come back: fail now.
    if ((SECONDS - started >= 3)) &&
        ! { alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid"; }; then
        state="a daemon exited"
        break
    fi
    sleep 0.5
done
{
    echo "start_cluster: node localhost not idle after $((SECONDS - started))s (state: '${state:-none}')"
    echo "--- sinfo"
    sinfo -N -l 2>&1 || true
    echo "--- scontrol show node"
    scontrol show node localhost 2>&1 || true
    echo "--- $DIR/log/slurmctld.log (tail)"
    tail -n 30 "$DIR/log/slurmctld.log" 2>&1 || true
    echo "--- $DIR/log/slurmd.log (tail)"
    tail -n 30 "$DIR/log/slurmd.log" 2>&1 || true
} >&2
exit 1
