#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for running the workflow through
# snakemake-executor-plugin-slurm in CI and in the `slurm`-marked tests.
#
#   .ci/slurm.sh up      install if needed, configure, start, wait until the node is idle
#   .ci/slurm.sh down    stop slurmd, slurmctld and munged
#   .ci/slurm.sh status  which daemons run, and what sinfo/squeue say
#
# Meant for a root shell on Debian 12 without systemd (a CI container): the
# daemons are started directly. No cgroups and no accounting database, so
# processes are tracked by /proc (proctrack/linuxproc) and jobs are polled
# with squeue, which needs finished jobs to stay visible for MinJobAge.
# `up` is idempotent: a cluster already running with the same configuration
# is left alone; one running with a different configuration is restarted.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MUNGE_KEY=/etc/munge/munge.key
# Hash of the slurm.conf the running daemons were started with.
STARTED_WITH=/run/slurm-ci.conf.sha256
PARTITION=debug
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-90}

log() { printf 'slurm.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (daemons run as root, config goes to /etc/slurm), uid is $(id -u)"

# pid_alive PIDFILE NAME: the pid in PIDFILE is a running process called NAME.
pid_alive() {
    local pid
    [[ -r $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$2" ]]
}

# stop_pid PIDFILE NAME: SIGTERM the daemon and wait (up to 20 s) until it is gone.
stop_pid() {
    local pid i
    pid_alive "$1" "$2" || return 0
    pid=$(<"$1")
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        [[ -d /proc/$pid ]] || { rm -f "$1"; return 0; }
        sleep 0.1
    done
    log "$2 (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

install_packages() {
    local missing=()
    local pkg
    for pkg in slurmctld slurmd slurm-client munge; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

# The short hostname is both SlurmctldHost and NodeName, so it must resolve.
ensure_hostname_resolves() {
    local host
    host=$(hostname -s)
    if ! getent hosts "$host" >/dev/null; then
        log "adding $host to /etc/hosts"
        printf '127.0.1.1\t%s\n' "$host" >>/etc/hosts
    fi
}

render_config() {
    local host cpus mem real_mem def_mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [[ $mem =~ ^[0-9]+$ ]] || die "could not read RealMemory from 'slurmd -C': $(slurmd -C 2>&1 | head -1)"
    # A node that reports less memory than configured is drained, so stay 5 % below.
    real_mem=$((mem * 95 / 100))
    # Without a default, a job that gives no memory gets the whole node and jobs run one at a time.
    def_mem=$((real_mem / cpus))
    cat <<EOF
# Written by .ci/slurm.sh: a one-node cluster without cgroups or accounting.
ClusterName=ci
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
MailProg=/bin/true
MpiDefault=none
# No cgroups in a container: track job processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# No slurmdbd: sacct fails, so clients poll with squeue.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
# A node that was down (e.g. slurmd restarted) comes back by itself once it registers.
ReturnToService=2
# squeue shows finished jobs for this long; the Snakemake plugin needs >= 3 x its first poll delay.
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=7-00:00:00 State=UP
EOF
}

start_munge() {
    if pid_alive "$MUNGE_PID" munged; then
        return 0
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    munge -n | unmunge >/dev/null || die "munged started but a credential does not round-trip; see /var/log/munge/munged.log"
}

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -r $f ]] || continue
        printf '\n===== last lines of %s =====\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
    printf '\n===== scontrol show node =====\n' >&2
    scontrol show node >&2 2>&1 || true
}

# wait_for_node SINCE: wait until slurmd has registered (if it was started at epoch
# second SINCE; until then slurmctld shows the state it saved at its last stop) and
# the node is idle, or mixed/allocated when jobs already run. A drain also survives
# restarts in the saved state (e.g. "Low RealMemory" from an earlier configuration),
# so a drained node is resumed once; if it drains again, or slurmctld rejects its
# registration (inval), waiting longer would not help.
wait_for_node() {
    local deadline state="" reason resumed=0 registered
    deadline=$((SECONDS + UP_TIMEOUT))
    while ((SECONDS < deadline)); do
        registered=$(scontrol show node -o "$(hostname -s)" 2>/dev/null |
            sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
        registered=$(date -d "$registered" +%s 2>/dev/null || echo 0)
        if ((registered < $1)); then
            state="not registered yet"
            sleep 0.5
            continue
        fi
        state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
            drain*)
                reason=$(sinfo -h -N -o %E | head -n 1)
                if ((resumed)); then
                    show_logs
                    die "node drained again after resuming it (reason: $reason); daemon logs above"
                fi
                log "node is $state (reason: $reason); resuming it"
                scontrol update NodeName="$(hostname -s)" State=RESUME
                resumed=1
                ;;
            inval)
                show_logs
                die "slurmctld rejected the node's registration (reason: $(sinfo -h -N -o %E | head -n 1)); daemon logs above"
                ;;
        esac
        sleep 0.5
    done
    show_logs
    die "node not idle after ${UP_TIMEOUT} s (sinfo state: '${state:-no answer}'); daemon logs above"
}

cmd_up() {
    local t0 wanted want_hash slurmd_since
    t0=$EPOCHREALTIME
    install_packages
    ensure_hostname_resolves
    install -d -m 0755 /etc/slurm "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"

    wanted=$(render_config)
    want_hash=$(sha256sum <<<"$wanted" | cut -d' ' -f1)
    if [[ ! -f $CONF ]] || [[ $(<"$CONF") != "$wanted" ]]; then
        log "writing $CONF"
        printf '%s\n' "$wanted" >"$CONF"
    fi

    start_munge

    # Daemons running with another configuration (or started by hand) are restarted.
    if pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; then
        if [[ -r $STARTED_WITH && $(<"$STARTED_WITH") == "$want_hash" ]] &&
            pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd; then
            log "already running with this configuration"
        else
            log "running with a different configuration (or partly); restarting"
            stop_pid "$SLURMD_PID" slurmd
            stop_pid "$CTLD_PID" slurmctld
        fi
    fi

    if ! pid_alive "$CTLD_PID" slurmctld; then
        log "starting slurmctld"
        slurmctld || { show_logs; die "slurmctld did not start"; }
    fi
    slurmd_since=0
    if ! pid_alive "$SLURMD_PID" slurmd; then
        log "starting slurmd"
        slurmd_since=$(date +%s)
        slurmd || { show_logs; die "slurmd did not start"; }
    fi
    printf '%s\n' "$want_hash" >"$STARTED_WITH"

    wait_for_node "$slurmd_since"
    sinfo
    awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "slurm.sh: cluster up in %.1f s\n", b - a }' >&2
}

cmd_down() {
    stop_pid "$SLURMD_PID" slurmd
    stop_pid "$CTLD_PID" slurmctld
    stop_pid "$MUNGE_PID" munged
    rm -f "$STARTED_WITH"
    log "stopped"
}

cmd_status() {
    local rc=0 d f
    for d in munged:$MUNGE_PID slurmctld:$CTLD_PID slurmd:$SLURMD_PID; do
        f=${d#*:}
        if pid_alive "$f" "${d%%:*}"; then
            printf '%-10s running (pid %s)\n' "${d%%:*}" "$(<"$f")"
        else
            printf '%-10s stopped\n' "${d%%:*}"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo -N -l
        squeue
    fi
    return "$rc"
}

case ${1:-} in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 up|down|status" >&2
        exit 2
        ;;
esac
