#!/usr/bin/env bash
# Stop the one-node SLURM cluster that tests/slurm/start_cluster.sh DIR started: cancel its
# jobs, then stop slurmd, slurmctld (and munged, if start_cluster.sh started it) by the PIDs
# in their pid files, wait for them to exit and remove the /etc/slurm links to DIR/etc.
# Safe to run twice, or when nothing runs.
#
#   tests/slurm/stop_cluster.sh DIR [--keep-munge]
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 STATE_DIR [--keep-munge]" >&2
    exit 2
fi
DIR=$1
KEEP_MUNGE=${2:-}
[[ -d $DIR ]] || exit 0
DIR=$(cd "$DIR" && pwd)
export SLURM_CONF=$DIR/etc/slurm.conf

pid_of() { [[ -s $1 ]] && cat "$1"; }
alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

# Stop a daemon by its pid file: SIGTERM, wait up to 15 s, then SIGKILL.
stop() {
    local name=$1 pidfile=$2 pid
    pid=$(pid_of "$pidfile") || return 0
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 150); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            echo "stop_cluster: $name ($pid) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
            for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        fi
        echo "stop_cluster: stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

# Cancel jobs first, so that no job step outlives slurmd.
ctld=$(pid_of "$DIR/run/slurmctld.pid")
if alive "$ctld" && [[ -f $SLURM_CONF ]]; then
    jobs=$(squeue -h -t PD,R,CG,CF -o %i 2>/dev/null)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 100); do
            [[ -z $(squeue -h -t PD,R,CG,CF -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
fi

stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
# The configuration links that start_cluster.sh made (only ours).
for f in slurm.conf gres.conf; do
    [[ $(readlink "/etc/slurm/$f" 2>/dev/null) == "$DIR/etc/$f" ]] && rm -f "/etc/slurm/$f"
done
if [[ $KEEP_MUNGE != --keep-munge && -s $DIR/munged.pid.ours ]]; then
    ours=$(cat "$DIR/munged.pid.ours")
    # Only the munged that start_cluster.sh started (same pid as munge's own pid file).
    if [[ $(pid_of /run/munge/munged.pid) == "$ours" ]]; then
        stop munged /run/munge/munged.pid
    fi
    rm -f "$DIR/munged.pid.ours"
fi
exit 0
