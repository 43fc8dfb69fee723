#!/usr/bin/env bash
# The one launcher behind every slurm/*.sbatch script:
#
#   slurm/launch.sh CONFIG_NAME [hydra overrides...]
#
# 1. Validates the environment before anything starts and fails in seconds naming what is
#    missing: container image and mounts (or the local venv), the config and its overrides,
#    model / data / HF-cache paths (checked by slurm/read_config.py in the trainer's own Python),
#    node and GPU counts of the allocation against the config's `cluster` section.
# 2. backend=nemo_rl: starts a Ray cluster over the allocation (head on the first node, one
#    worker per other node via srun, optionally inside a pyxis container), waits until every
#    node joined, then runs `python -m nemo_entropy.train` on the head node.
#    backend=local: runs the embedded engine with torchrun, one agent per node via srun.
# 3. Pre-emption: Slurm sends USR1 to this shell before the time limit (#SBATCH
#    --signal=B:USR1@N). We create the PREEMPT file the trainer polls at every step boundary
#    (torchrun does not forward signals to its workers); the trainer checkpoints and exits with
#    code 3, and we requeue the job. The requeued run resumes from the newest checkpoint.
#
# Logs: logs/<jobid>/ under the submit directory (launcher.log, config.env, the trainer's
# metrics, per-node train / Ray logs). DRY_RUN=1 prints every command instead of running it,
# inside an allocation or on a login node (then the allocation is taken from the config).
#
# Environment (all optional):
#   CONTAINER                 pyxis image (file or registry ref) for every srun step
#   MOUNTS                    pyxis mounts, src:dst[:flags],...; the repo and submit dir are added
#   NEMO_ENTROPY_PYTHON       trainer Python (default: <repo>/.venv/bin/python, `python` in a container)
#   NEMO_ENTROPY_CONF_DIR   Hydra config directory (default: <repo>/conf)
#   NEMO_ENTROPY_TRAIN_MODULE module run as the trainer (default: nemo_entropy.train)
#   NEMO_ENTROPY_PREEMPT_FILE pre-emption file (default: <checkpoint_dir>/PREEMPT)
#   NEMO_ENTROPY_RDZV_PORT    torchrun rendezvous port on the head (default: 29400 + jobid % 1000)
#   NPROC_PER_NODE            processes per node for backend=local without GPUs (default: 1)
#   RAY_PORT                  Ray GCS port (default 6379); RAY_NODE_PORT_BASE (default 6800)
#   RAY_WAIT_TIMEOUT          seconds to wait for every node to join Ray (default 600)
#   HF_HOME, HF_TOKEN, WANDB_API_KEY are passed through to every step.
set -euo pipefail

REQUEUE_EXIT_CODE=3
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=${DRY_RUN:-0}

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit 2
fi
CONFIG_NAME=$1
shift
OVERRIDES=("$@")
CONFIG_DIR=${NEMO_ENTROPY_CONF_DIR:-$REPO/conf}
TRAIN_MODULE=${NEMO_ENTROPY_TRAIN_MODULE:-nemo_entropy.train}

# ---------------------------------------------------------------------------------------------
# Messages and command execution

LOG_DIR=""
say() {
    local line
    line="[launch $(date +%H:%M:%S)] $*"
    echo "$line"
    if [[ -n $LOG_DIR && $DRY_RUN != 1 ]]; then echo "$line" >>"$LOG_DIR/launcher.log"; fi
}

PROBLEMS=()
problem() { PROBLEMS+=("$*"); }

fail_on_problems() {
    if [[ ${#PROBLEMS[@]} -eq 0 ]]; then return; fi
    say "cannot start: ${#PROBLEMS[@]} problem(s):"
    local p
    for p in "${PROBLEMS[@]}"; do say "  - $p"; done
    exit 2
}

# Prints a command the way a shell would read it back (words with specials in single quotes).
quoted() {
    local out="" word squote="'" escaped="'\\''"
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
            out+="$word "
        else
            out+="'${word//$squote/$escaped}' "
        fi
    done
    echo "${out% }"
}

# Runs a command (or, with DRY_RUN=1, only prints it).
run() {
    if [[ $DRY_RUN == 1 ]]; then
        echo "+ $(quoted "$@")"
        return 0
    fi
    say "run: $(quoted "$@")"
    "$@"
}

# Starts a command in the background and sets BG_PID (DRY_RUN=1: prints it, BG_PID is empty).
BG_PID=""
run_bg() {
    if [[ $DRY_RUN == 1 ]]; then
        echo "+ $(quoted "$@") &"
        BG_PID=""
        return 0
    fi
    say "run in background: $(quoted "$@")"
    "$@" &
    BG_PID=$!
}

# ---------------------------------------------------------------------------------------------
# The allocation

IN_ALLOCATION=0
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    IN_ALLOCATION=1
elif [[ $DRY_RUN != 1 ]]; then
    say "not inside a Slurm allocation: submit with sbatch (e.g. sbatch slurm/32b_kl_cov.sbatch ...), or set DRY_RUN=1 to print the commands"
    exit 2
fi

JOB_ID=${SLURM_JOB_ID:-dryrun}
RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
cd "$SUBMIT_DIR"
LOG_DIR=$SUBMIT_DIR/logs/$JOB_ID
if [[ $DRY_RUN != 1 ]]; then mkdir -p "$LOG_DIR"; fi
say "job $JOB_ID (restart $RESTART_COUNT), config $CONFIG_NAME, logs in $LOG_DIR"

# Logs of this job go to logs/<jobid>/ unless the user chose a log_dir: the trainer's metrics
# land next to the launcher's own logs, and a requeued run (same job id) appends to them.
# True when the user's overrides set KEY (key=, +key= or ++key=).
has_override() {
    local key=$1 o
    for o in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
        if [[ ${o#"${o%%[!+]*}"} == "$key="* ]]; then return 0; fi
    done
    return 1
}
if ! has_override logger.log_dir; then OVERRIDES+=("logger.log_dir=$LOG_DIR"); fi

# ---------------------------------------------------------------------------------------------
# Validation, part 1: what the host shell can see

[[ -f $CONFIG_DIR/$CONFIG_NAME.yaml ]] || problem "config $CONFIG_NAME not found: $CONFIG_DIR/$CONFIG_NAME.yaml does not exist (NEMO_ENTROPY_CONF_DIR=$CONFIG_DIR)"

CONTAINER=${CONTAINER:-}
MOUNTS=${MOUNTS:-}
CONTAINER_ARGS=()
if [[ -n $CONTAINER ]]; then
    if [[ $IN_ALLOCATION == 1 ]] && ! srun --help 2>&1 | grep -q -- '--container-image'; then
        problem "CONTAINER=$CONTAINER is set but this cluster's srun has no --container-image (the pyxis plugin is missing): unset CONTAINER to use a local venv"
    fi
    if [[ $CONTAINER == /* || $CONTAINER == ./* || $CONTAINER == *.sqsh ]] && [[ ! -f $CONTAINER ]]; then
        problem "CONTAINER=$CONTAINER: container image file does not exist"
    fi
    # The container must see the plugin, this launcher's helpers and the log directory at the
    # same paths as the host: mount them unless a mount already covers them.
    all_mounts=$MOUNTS
    for needed in "$REPO" "$SUBMIT_DIR"; do
        covered=0
        IFS=',' read -r -a mount_list <<<"$all_mounts"
        for m in "${mount_list[@]+"${mount_list[@]}"}"; do
            dst=$(cut -d: -f2 <<<"$m:")
            [[ -n $dst && ($needed == "$dst" || $needed == "$dst"/*) ]] && covered=1
        done
        if [[ $covered == 0 ]]; then all_mounts=${all_mounts:+$all_mounts,}$needed:$needed; fi
    done
    IFS=',' read -r -a mount_list <<<"$MOUNTS"
    for m in "${mount_list[@]+"${mount_list[@]}"}"; do
        src=${m%%:*}
        [[ -e $src ]] || problem "MOUNTS entry $m: source $src does not exist on $(hostname)"
    done
    CONTAINER_ARGS=(--container-image="$CONTAINER" --container-mounts="$all_mounts" --container-workdir="$SUBMIT_DIR")
    PYTHON=${NEMO_ENTROPY_PYTHON:-python}
else
    if [[ -n $MOUNTS ]]; then problem "MOUNTS is set but CONTAINER is not: mounts only apply to a container"; fi
    PYTHON=${NEMO_ENTROPY_PYTHON:-$REPO/.venv/bin/python}
    if [[ ! -x $PYTHON ]]; then
        problem "no container and no Python at $PYTHON: run 'make setup' in $REPO, set NEMO_ENTROPY_PYTHON, or set CONTAINER to the NeMo-RL image"
    fi
fi
fail_on_problems

# The plugin reaches every process (and, with NeMo-RL, every Ray worker, whose environment is
# forwarded from the driver) through PYTHONPATH.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export NEMO_ENTROPY_JOB_ID=$JOB_ID

# ---------------------------------------------------------------------------------------------
# Validation, part 2: the composed config, read by the trainer's own Python (inside the
# container when there is one), so paths are checked as the trainer will see them.

READ_CONFIG=("$PYTHON" "$REPO/slurm/read_config.py" --config-dir "$CONFIG_DIR" --config-name "$CONFIG_NAME" --check-paths -- "${OVERRIDES[@]}")
if [[ -n $CONTAINER && $IN_ALLOCATION == 1 ]]; then
    READ_CONFIG=(srun --overlap --nodes=1 --ntasks=1 --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" "${READ_CONFIG[@]}")
elif [[ -n $CONTAINER ]]; then
    # A dry run on a login node cannot enter the container: compose with a host Python and leave
    # the path checks (container paths) to the real submission.
    host_python=$REPO/.venv/bin/python
    [[ -x $host_python ]] || host_python=python3
    READ_CONFIG=("$host_python" "$REPO/slurm/read_config.py" --config-dir "$CONFIG_DIR" --config-name "$CONFIG_NAME" -- "${OVERRIDES[@]}")
    say "dry run outside Slurm with CONTAINER: paths are checked inside the container when the job runs"
fi
[[ $DRY_RUN == 1 ]] && echo "+ $(quoted "${READ_CONFIG[@]}")   # runs in dry-run too: it only reads"
config_err=$(mktemp)
if ! config_env=$("${READ_CONFIG[@]}" 2>"$config_err"); then
    say "cannot start: the config does not compose:"
    while IFS= read -r line; do say "  $line"; done <"$config_err"
    rm -f "$config_err"
    exit 2
fi
rm -f "$config_err"
NE_BACKEND="" NE_NUM_NODES="" NE_GPUS_PER_NODE="" NE_CHECKPOINT_DIR="" NE_CHECKPOINTING_ENABLED=0
NE_PROBLEMS=()
# read_config.py prints only shell-quoted assignments (shlex.quote).
eval "$config_env"
if [[ $DRY_RUN != 1 ]]; then printf '%s\n' "$config_env" >"$LOG_DIR/config.env"; fi
for p in "${NE_PROBLEMS[@]+"${NE_PROBLEMS[@]}"}"; do problem "$p"; done
say "backend=$NE_BACKEND cluster.num_nodes=$NE_NUM_NODES cluster.gpus_per_node=$NE_GPUS_PER_NODE checkpoint_dir=$NE_CHECKPOINT_DIR"

# Nodes of the allocation (a dry run outside Slurm pretends to have what the config asks for).
if [[ $IN_ALLOCATION == 1 ]]; then
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    NUM_NODES=${SLURM_JOB_NUM_NODES:-${#NODES[@]}}
else
    NUM_NODES=${NE_NUM_NODES:-1}
    NODES=()
    for ((i = 1; i <= NUM_NODES; i++)); do NODES+=("node$i"); done
fi
HEAD_NODE=${NODES[0]}

if ! [[ $NE_NUM_NODES =~ ^[0-9]+$ ]]; then
    problem "cluster.num_nodes=$NE_NUM_NODES: must be a positive integer"
elif [[ $NE_NUM_NODES != "$NUM_NODES" ]]; then
    problem "node-count mismatch: cluster.num_nodes=$NE_NUM_NODES but the allocation has $NUM_NODES node(s) (SLURM_JOB_NUM_NODES); submit with sbatch --nodes=$NE_NUM_NODES or override cluster.num_nodes=$NUM_NODES"
fi

# GPUs per node that Slurm allocated: SLURM_GPUS_ON_NODE, else --gpus-per-node ("[type:]count").
ALLOC_GPUS=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
ALLOC_GPUS=${ALLOC_GPUS##*:}
if [[ -z $ALLOC_GPUS && $IN_ALLOCATION == 1 ]] && command -v nvidia-smi >/dev/null 2>&1; then
    ALLOC_GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [[ $IN_ALLOCATION == 0 ]]; then ALLOC_GPUS=$NE_GPUS_PER_NODE; fi

if [[ $NE_BACKEND == nemo_rl ]]; then
    if [[ -z $ALLOC_GPUS ]]; then
        say "warning: cannot tell how many GPUs Slurm allocated per node (no GRES, no nvidia-smi); trusting cluster.gpus_per_node=$NE_GPUS_PER_NODE"
    elif [[ $ALLOC_GPUS != "$NE_GPUS_PER_NODE" ]]; then
        problem "GPU-count mismatch: cluster.gpus_per_node=$NE_GPUS_PER_NODE but Slurm allocated $ALLOC_GPUS GPU(s) per node (--gpus-per-node)"
    fi
    NPROC=$NE_GPUS_PER_NODE
else
    if [[ -n $ALLOC_GPUS && $ALLOC_GPUS != 0 ]]; then
        if [[ $ALLOC_GPUS != "$NE_GPUS_PER_NODE" ]]; then
            problem "GPU-count mismatch: cluster.gpus_per_node=$NE_GPUS_PER_NODE but Slurm allocated $ALLOC_GPUS GPU(s) per node"
        fi
        NPROC=$ALLOC_GPUS
    else
        # The embedded engine is a CPU trainer: one agent process per node unless told otherwise.
        NPROC=${NPROC_PER_NODE:-1}
    fi
fi
fail_on_problems
say "validated: $NUM_NODES node(s) [${NODES[*]}], $NPROC process(es) per node, python $PYTHON${CONTAINER:+ in $CONTAINER}"

# ---------------------------------------------------------------------------------------------
# Pre-emption: USR1 (or TERM) -> PREEMPT file -> trainer checkpoints, exits 3 -> requeue.

PREEMPT_FILE=${NEMO_ENTROPY_PREEMPT_FILE:-}
if [[ -z $PREEMPT_FILE && -n $NE_CHECKPOINT_DIR ]]; then PREEMPT_FILE=$NE_CHECKPOINT_DIR/PREEMPT; fi
if [[ -n $PREEMPT_FILE ]]; then export NEMO_ENTROPY_PREEMPT_FILE=$PREEMPT_FILE; fi
if [[ $NE_CHECKPOINTING_ENABLED != 1 ]]; then
    say "warning: checkpointing.enabled is false: a pre-empted or requeued run starts from scratch"
fi
if [[ $DRY_RUN != 1 && -n $PREEMPT_FILE ]]; then
    # A file left by a run that died mid-save would stop this run at its first step.
    rm -f "$PREEMPT_FILE"
fi

PREEMPT_REQUESTED=0
request_checkpoint() {
    local signal=$1
    PREEMPT_REQUESTED=1
    if [[ -z $PREEMPT_FILE ]]; then
        say "received $signal but no checkpoint_dir / NEMO_ENTROPY_PREEMPT_FILE: cannot ask the trainer to checkpoint"
        return
    fi
    say "received $signal: asking the trainer to checkpoint and stop ($PREEMPT_FILE)"
    mkdir -p "$(dirname "$PREEMPT_FILE")"
    echo "$signal $(date +%s)" >"$PREEMPT_FILE"
}
# TERM comes from scancel or the hard time limit: the trainer still saves, but the job is not
# requeued (a cancelled job must stay cancelled).
TERMINATED=0
trap 'request_checkpoint USR1' USR1
trap 'TERMINATED=1; request_checkpoint TERM' TERM

# Waits for a background pid; a trapped signal interrupts `wait`, so wait again until it exits.
wait_for_exit() {
    local pid=$1 rc=0
    while true; do
        rc=0
        wait "$pid" || rc=$?
        if ! kill -0 "$pid" 2>/dev/null; then
            # A status > 128 is either a trap interrupting `wait` just before the exit (then one more
            # `wait` returns the real status) or a death by signal (then that `wait` says 127).
            if [[ $rc -gt 128 ]]; then
                local again=0
                wait "$pid" 2>/dev/null || again=$?
                if [[ $again != 127 ]]; then rc=$again; fi
            fi
            return "$rc"
        fi
    done
}

# Address other nodes use to reach the head: its NodeAddr in Slurm, else what DNS says.
node_address() {
    local node=$1 addr=""
    if [[ $IN_ALLOCATION == 1 ]]; then
        addr=$(scontrol show node -o "$node" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
    fi
    if [[ -z $addr || $addr == "$node" ]]; then
        addr=$(getent hosts "$node" 2>/dev/null | awk '{print $1; exit}')
    fi
    echo "${addr:-$node}"
}
HEAD_ADDR=$(node_address "$HEAD_NODE")

# Seconds in a Slurm duration ([D-]HH:MM:SS, MM:SS or SS); empty for UNLIMITED / NOT_SET.
slurm_duration_seconds() {
    local text=$1 days=0 h=0 m=0 s=0
    [[ $text =~ ^([0-9]+-)?[0-9:]+$ ]] || return 0
    if [[ $text == *-* ]]; then days=${text%%-*}; text=${text#*-}; fi
    IFS=: read -r -a parts <<<"$text"
    case ${#parts[@]} in
        3) h=${parts[0]} m=${parts[1]} s=${parts[2]} ;;
        2) m=${parts[0]} s=${parts[1]} ;;
        1) s=${parts[0]} ;;
    esac
    echo $((10#$days * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s))
}

# NeMo-RL stops on its own clock, not on a signal: with checkpointing.checkpoint_must_save_by it
# saves and returns once that much time has passed (fitting the last save in). Point it at the
# job's time left minus the pre-emption margin, so the save lands where USR1 would have asked for it.
SAVE_MARGIN=${NEMO_ENTROPY_SAVE_MARGIN:-600}
NEMO_RL_SAVE_BY=""
if [[ $NE_BACKEND == nemo_rl && $NE_CHECKPOINTING_ENABLED == 1 && $IN_ALLOCATION == 1 ]] \
    && ! has_override checkpointing.checkpoint_must_save_by; then
    time_left=$(slurm_duration_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null)")
    if [[ -n $time_left ]] && ((time_left > SAVE_MARGIN)); then
        budget=$((time_left - SAVE_MARGIN))
        NEMO_RL_SAVE_BY=$(printf '%02d:%02d:%02d:%02d' $((budget / 86400)) $((budget % 86400 / 3600)) $((budget % 3600 / 60)) $((budget % 60)))
        OVERRIDES+=("++checkpointing.checkpoint_must_save_by=$NEMO_RL_SAVE_BY")
        say "NeMo-RL saves and stops after $NEMO_RL_SAVE_BY (time left ${time_left}s - margin ${SAVE_MARGIN}s); the job then requeues"
    fi
fi

TRAIN_ARGS=(-m "$TRAIN_MODULE" --config-dir "$CONFIG_DIR" --config-name "$CONFIG_NAME" "${OVERRIDES[@]}")
# One srun step per role. --overlap: steps of one job may share nodes (the Ray driver runs
# next to the Ray head). --kill-on-bad-exit=0: a rank exiting 3 must not get its peers killed
# before they too have saved.
SRUN=(srun --overlap --kill-on-bad-exit=0 "${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"}")

# ---------------------------------------------------------------------------------------------
# backend=local: torchrun, one agent per node

launch_local() {
    local port=${NEMO_ENTROPY_RDZV_PORT:-$((29400 + ${SLURM_JOB_ID:-0} % 1000))}
    local step=(
        "${SRUN[@]}" --nodes="$NUM_NODES" --ntasks="$NUM_NODES" --ntasks-per-node=1
        --output="$LOG_DIR/train-node%t.log" --open-mode=append
        "$PYTHON" "$REPO/slurm/torchrun_node.py" --head-node "$HEAD_NODE" --
        --nnodes="$NUM_NODES" --nproc-per-node="$NPROC"
        --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$port" --rdzv-id="$JOB_ID-$RESTART_COUNT"
        "${TRAIN_ARGS[@]}"
    )
    say "starting the local engine: $NUM_NODES node(s) x $NPROC process(es), rendezvous $HEAD_ADDR:$port; follow $LOG_DIR/train-node0.log"
    run_bg "${step[@]}"
    TRAIN_PID=$BG_PID
}

# ---------------------------------------------------------------------------------------------
# backend=nemo_rl: a Ray cluster over the allocation, the driver on the head node

RAY_PIDS=()
launch_nemo_rl() {
    local gcs_port=${RAY_PORT:-6379}
    local base=${RAY_NODE_PORT_BASE:-6800}
    local timeout=${RAY_WAIT_TIMEOUT:-600}
    # Per-node Ray service ports; the head uses base+2k, workers base+2k+1, so a head and a
    # worker sharing one host (a test cluster) never collide.
    ray_ports() {
        local offset=$1
        echo "--node-manager-port=$((base + offset)) --object-manager-port=$((base + 2 + offset))" \
            "--runtime-env-agent-port=$((base + 4 + offset)) --dashboard-agent-grpc-port=$((base + 6 + offset))" \
            "--dashboard-agent-listen-port=$((base + 8 + offset)) --metrics-export-port=$((base + 10 + offset))"
    }
    local head_ports worker_ports
    head_ports=$(ray_ports 0)
    worker_ports=$(ray_ports 1)

    # Preflight: the NeMo-RL installed where the driver runs (inside the container) must have every
    # interface the entry relies on, and this job's config (the same name and overrides as the driver's)
    # must merge onto NeMo-RL's base config, resolve and validate exactly as the entry will do it. A
    # mismatch stops the job here, in seconds, before Ray starts and any model is loaded, naming the cause.
    say "preflight: nemo-entropy check-nemo-rl --config-name $CONFIG_NAME on $HEAD_NODE (log $LOG_DIR/preflight.log)"
    if ! run "${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --output="$LOG_DIR/preflight.log" \
        "$PYTHON" -m nemo_entropy.cli check-nemo-rl --config-dir "$CONFIG_DIR" --config-name "$CONFIG_NAME" \
        "${OVERRIDES[@]}"; then
        say "cannot start: the installed NeMo-RL does not fit this plugin:"
        grep -E '^(FAIL|check-nemo-rl)' "$LOG_DIR/preflight.log" 2>/dev/null | while IFS= read -r line; do say "  $line"; done
        exit 2
    fi

    # No `ray stop` first: Slurm kills a job's processes when it ends, and on a test cluster whose
    # "nodes" share one host it would kill the other node's Ray.
    local head_cmd="exec ray start --head --disable-usage-stats --block \
--node-ip-address=$HEAD_ADDR --port=$gcs_port --num-gpus=$NE_GPUS_PER_NODE \
--resources='{\"nemo_entropy_slurm\": 1}' $head_ports"
    run_bg "${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --output="$LOG_DIR/ray-head.log" --open-mode=append \
        bash -c "$head_cmd"
    RAY_PIDS+=("$BG_PID")

    if ((NUM_NODES > 1)); then
        # Workers race the head's GCS: `ray start --address` fails until it listens, so retry.
        local worker_cmd="for attempt in \$(seq 60); do \
ray start --address=$HEAD_ADDR:$gcs_port --disable-usage-stats --block --num-gpus=$NE_GPUS_PER_NODE \
--resources='{\"nemo_entropy_slurm\": 1}' $worker_ports && exit 0; sleep 5; done; exit 1"
        run_bg "${SRUN[@]}" --nodes=$((NUM_NODES - 1)) --ntasks=$((NUM_NODES - 1)) --ntasks-per-node=1 \
            --exclude="$HEAD_NODE" --output="$LOG_DIR/ray-worker-%t.log" --open-mode=append bash -c "$worker_cmd"
        RAY_PIDS+=("$BG_PID")
    fi

    export RAY_ADDRESS=$HEAD_ADDR:$gcs_port
    say "Ray head $RAY_ADDRESS; the driver waits for $NUM_NODES node(s) (timeout ${timeout}s), log $LOG_DIR/driver.log"
    run_bg "${SRUN[@]}" --nodes=1 --ntasks=1 --nodelist="$HEAD_NODE" --output="$LOG_DIR/driver.log" --open-mode=append \
        "$PYTHON" "$REPO/slurm/ray_wait.py" --address "$RAY_ADDRESS" --nodes "$NUM_NODES" --timeout "$timeout" -- \
        "$PYTHON" "${TRAIN_ARGS[@]}"
    TRAIN_PID=$BG_PID
}

stop_ray() {
    local pid
    for pid in "${RAY_PIDS[@]+"${RAY_PIDS[@]}"}"; do
        if [[ -n $pid ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for pid in "${RAY_PIDS[@]+"${RAY_PIDS[@]}"}"; do
        if [[ -n $pid ]]; then wait "$pid" 2>/dev/null || true; fi
    done
}

# ---------------------------------------------------------------------------------------------
# Run, then turn the trainer's exit code into the job's fate

TRAIN_PID=""
case $NE_BACKEND in
    local) launch_local ;;
    nemo_rl) launch_nemo_rl ;;
esac

if [[ $DRY_RUN == 1 ]]; then
    echo "+ # exit code $REQUEUE_EXIT_CODE from the trainer -> scontrol requeue $JOB_ID"
    exit 0
fi

rc=0
wait_for_exit "$TRAIN_PID" || rc=$?
stop_ray

# NeMo-RL's own time-based stop exits 0; its message in the driver log tells it from the end of training.
if [[ $rc == 0 && -n $NEMO_RL_SAVE_BY ]] && grep -q 'Timeout has been reached, stopping training early' "$LOG_DIR/driver.log" 2>/dev/null; then
    say "NeMo-RL saved a checkpoint at its time budget ($NEMO_RL_SAVE_BY) and stopped early"
    rc=$REQUEUE_EXIT_CODE
fi
if [[ $rc == "$REQUEUE_EXIT_CODE" && $TERMINATED == 1 ]]; then
    say "trainer checkpointed after SIGTERM (scancel or the time limit): not requeued; resubmit to resume"
    exit 0
fi
if [[ $rc == "$REQUEUE_EXIT_CODE" ]]; then
    say "trainer checkpointed and asked to be requeued (exit $rc): scontrol requeue $JOB_ID"
    run scontrol requeue "$JOB_ID"
    exit 0
fi
if [[ $rc != 0 ]]; then
    if [[ $PREEMPT_REQUESTED == 1 ]]; then
        say "trainer exited with $rc after a pre-emption request, not with $REQUEUE_EXIT_CODE: not requeued; see $LOG_DIR"
    else
        say "trainer failed with exit code $rc; see $LOG_DIR"
    fi
    exit "$rc"
fi
say "trainer finished; logs and metrics in $LOG_DIR"
