# Shared by the sbatch scripts in examples/slurm/ (sourced, not run): rendezvous and requeue.
# shellcheck shell=bash

die() { echo "$(date '+%F %T') error: $*" >&2; exit 2; }
log() { echo "$(date '+%F %T') [job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# Slurm's commands present and running inside a job, else say how to submit.
require_slurm() {
    command -v scontrol >/dev/null || die "Slurm not found (no scontrol on PATH); submit this script with sbatch on a Slurm cluster"
    [[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a Slurm job; submit it with sbatch, e.g. sbatch $0"
}

# MASTER_ADDR = the job's first node, MASTER_PORT = a port free on it.
setup_rendezvous() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # The batch script runs on the first node, so a port free here is free on MASTER_ADDR.
    MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
    export MASTER_ADDR MASTER_PORT
    log "nodes: $SLURM_JOB_NODELIST, tasks: ${SLURM_NTASKS:-?}, rendezvous: $MASTER_ADDR:$MASTER_PORT"
}

# Run "$@" (an srun job step) in the background; on USR1 (sent to this batch shell by
# --signal=B:USR1@120 before the time limit, or by `scancel --batch --signal=USR1 JOBID`) send
# FORWARD_SIGNAL to the job steps' tasks (scancel signals without killing, unlike srun's own
# SIGTERM handling) so every rank saves a checkpoint and exits; then requeue the job, whose next
# start resumes from the latest checkpoint.
run_requeueable() {
    local step_pid status=0 requeue=0
    trap 'log "USR1: saving a checkpoint, then requeueing"; requeue=1; scancel --signal="$FORWARD_SIGNAL" "$SLURM_JOB_ID"' USR1
    "$@" &
    step_pid=$!
    while true; do
        wait "$step_pid" && status=0 || status=$?
        kill -0 "$step_pid" 2>/dev/null || break   # wait returned early because of the trap
    done
    trap - USR1
    if (( requeue )); then
        log "step ended ($status); requeueing"
        scontrol requeue "$SLURM_JOB_ID"
        sleep 60   # the requeue ends this script
    fi
    log "step ended with status $status"
    return "$status"
}
