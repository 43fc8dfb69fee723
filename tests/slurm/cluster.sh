#!/usr/bin/env bash
# Starts (or stops) a real Slurm cluster on this machine for the tests: munged, one slurmctld and
# two slurmd processes that act as the nodes n1 and n2 on localhost (`slurmd -N`).
#
#   tests/slurm/cluster.sh start    idempotent: starts what is not running, then waits until
#                                   `sinfo` shows both nodes idle; prints `SLURM_CONF=<path>`
#   tests/slurm/cluster.sh stop     cancels every job of this cluster, stops the daemons it started
#   tests/slurm/cluster.sh status   exit 0 when the controller answers and both nodes are idle
#
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (slurm/ci/install_slurm.sh).
# Everything lives under $NEMO_ENTROPY_SLURM_STATE (default /tmp/nemo-entropy-slurm); other tools
# reach this cluster through SLURM_CONF=$NEMO_ENTROPY_SLURM_STATE/slurm.conf.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
state=${NEMO_ENTROPY_SLURM_STATE:-/tmp/nemo-entropy-slurm}
ctld_port=${NEMO_ENTROPY_SLURMCTLD_PORT:-16817}
# The two slurmd share one host, so each needs its own port (NodeName=n[1-2] Port=a-b).
slurmd_port_first=${NEMO_ENTROPY_SLURMD_PORT:-17001}
nodes=(n1 n2)
export SLURM_CONF=$state/slurm.conf
# The daemons live in /usr/sbin, which a non-login root shell (CI) may not have on PATH.
export PATH=$PATH:/usr/sbin:/sbin

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

require_tools() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (slurmd and munged need it)"
    local tool
    for tool in munged slurmctld slurmd sinfo scontrol sbatch; do
        command -v "$tool" >/dev/null 2>&1 || die "missing $tool: run slurm/ci/install_slurm.sh"
    done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey -c -f -k /etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    runuser -u munge -- munged
    touch "$state/started-munged"
    local i
    for i in $(seq 50); do
        if munge_works; then return; fi
        sleep 0.1
        [[ $i -lt 50 ]] || die "munged did not come up"
    done
}

write_config() {
    local cpus host tmp
    cpus=$(nproc)
    host=$(hostname -s)
    mkdir -p "$state/ctld"
    tmp=$(mktemp "$state/slurm.conf.XXXXXX")
    sed -e "s|@HOSTNAME@|$host|g" \
        -e "s|@CTLD_PORT@|$ctld_port|g" \
        -e "s|@STATE_DIR@|$state|g" \
        -e "s|@SLURMD_PORTS@|$slurmd_port_first-$((slurmd_port_first + ${#nodes[@]} - 1))|g" \
        -e "s|@CPUS@|$cpus|g" \
        "$here/slurm.conf.in" >"$tmp"
    # Rewriting an identical file would be harmless, but keeping it lets a running controller
    # and a later `start` agree on one configuration.
    if [[ -f $SLURM_CONF ]] && cmp -s "$tmp" "$SLURM_CONF"; then
        rm -f "$tmp"
        return 1
    fi
    mv "$tmp" "$SLURM_CONF"
    chmod 0644 "$SLURM_CONF"
}

wait_for() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "timed out after ${seconds}s waiting for $what (logs in $state)"
        fi
        sleep 0.5
    done
}

both_nodes_idle() {
    local states
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
    [[ $(grep -cE '^n[12] idle$' <<<"$states") -eq ${#nodes[@]} ]]
}

# Like both_nodes_idle, but a node left DOWN or DRAINED by an earlier crash is put back into
# service instead of failing the tests.
nodes_idle_or_resumed() {
    if both_nodes_idle; then return 0; fi
    local stuck
    stuck=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 ~ /^(down|drain|drng|fail)/ {print $1}' | sort -u | paste -sd, -)
    if [[ -n $stuck ]]; then scontrol update NodeName="$stuck" State=RESUME >/dev/null 2>&1 || true; fi
    return 1
}

start() {
    require_tools
    mkdir -p "$state"
    start_munge
    # Daemons running with an older configuration are restarted with the new one.
    if write_config; then stop_daemons; fi
    if ! scontrol ping 2>/dev/null | grep -q 'is UP'; then
        # -c: forget jobs of an earlier session, so no stale allocation holds the nodes.
        slurmctld -c
        wait_for "slurmctld" 30 bash -c 'scontrol ping | grep -q "is UP"'
    fi
    local node
    for node in "${nodes[@]}"; do
        mkdir -p "$state/slurmd-$node"
        if ! pid_alive "$state/slurmd-$node.pid"; then
            slurmd -N "$node"
        fi
    done
    wait_for "both nodes idle in sinfo" 60 nodes_idle_or_resumed
    echo "SLURM_CONF=$SLURM_CONF"
}

stop() {
    if [[ -f $SLURM_CONF ]] && scontrol ping 2>/dev/null | grep -q 'is UP'; then
        scancel --full --quiet --partition=debug 2>/dev/null || true
        # Give the step daemons a moment to kill and reap the jobs' processes.
        local i
        for i in $(seq 30); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_daemons
    if [[ -f $state/started-munged ]] && pid_alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$state/started-munged"
    fi
}

stop_daemons() {
    local pidfile pid i
    for pidfile in "$state"/slurmd-*.pid "$state/slurmctld.pid"; do
        if pid_alive "$pidfile"; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for i in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
    done
}

status() {
    [[ -f $SLURM_CONF ]] && scontrol ping 2>/dev/null | grep -q 'is UP' && both_nodes_idle
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
