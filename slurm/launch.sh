#!/usr/bin/env bash
# The shared body of slurm/pretrain.sh and slurm/finetune.sh, which `exec` it as the batch
# shell (so the signals Slurm sends to the batch shell land here). Not submitted directly.
#
#   launch.sh DEFAULT_RECIPE [RECIPE.yaml] [key.sub=value ...]
#
# One torchrun per node (srun --ntasks-per-node=1), c10d rendezvous on the first node of the
# allocation, one worker per GPU running mmscale/train.py. Stopping (details: docs/SLURM.md):
#   USR1 to this shell (#SBATCH --signal=B:USR1@N before the time limit; preemption with
#   PreemptParameters=send_user_signal; by hand: scancel --batch --signal=USR1 JOBID)
#     -> SIGTERM to the training step only (scancel --signal=TERM JOBID: neither this shell
#        nor srun, which would answer a SIGTERM of its own by killing the step)
#     -> torchrun passes it to its workers; the ranks finish their step, checkpoint together
#        and exit (mmscale.engine.PREEMPTED_EXIT)
#     -> this shell runs `scontrol requeue JOBID`; the rerun resumes from checkpoints/latest.
#   SIGTERM from Slurm itself (scontrol requeue, preemption, scancel, the time limit): Slurm
#   signals every process of the job; the ranks checkpoint the same way if they manage within
#   KillWait (GraceTime for preemption), else they are killed and the rerun resumes from the
#   last periodic checkpoint (train.checkpoint_every). Slurm requeues when it decided to
#   (requeue, preemption in REQUEUE mode, node failure with --requeue); scancel is final.
#
# Environment: MMSCALE_PYTHON (default .venv/bin/python if present, else python3),
# MMSCALE_NPROC_PER_NODE (workers per node; default the GPUs asked for per node),
# MMSCALE_MASTER_ADDR / MMSCALE_MASTER_PORT (rendezvous; default the first node, a port
# derived from the job id), MMSCALE_SRUN_ARGS (extra srun options, e.g. pyxis'
# --container-image=...), MMSCALE_LAUNCH_PREFIX (put before python on every node, e.g.
# "apptainer exec --nv img.sif"), MMSCALE_STOP_TIMEOUT (seconds torchrun gives its workers
# after SIGTERM before SIGKILL; 150, keep it below the --signal lead time).
# shellcheck disable=SC2317  # (the signal handlers below run from traps)
set -uo pipefail

log() { echo "[mmscale-slurm $(date '+%F %T')] $*"; }
die() { log "error: $1" >&2; exit "${2:-1}"; }

# --- signals: trapped first, so an early USR1 cannot end the job unrequeued
stop=""
srun_pid=""
forward_stop() {
  # the step only (not this batch shell, not srun: srun turns SIGTERM into SIGKILL)
  [ -n "$srun_pid" ] && scancel --signal=TERM "$SLURM_JOB_ID"
}
on_usr1() {
  [ -n "$stop" ] && return
  stop=USR1
  log "got USR1: asking the workers to checkpoint and stop, then requeueing"
  forward_stop
}
on_term() {
  [ -n "$stop" ] || stop=TERM
  log "got SIGTERM from Slurm (cancel, requeue, preemption or time limit); the step is being stopped"
}
trap on_usr1 USR1
trap on_term TERM

[ $# -ge 1 ] || die "usage: launch.sh DEFAULT_RECIPE [RECIPE.yaml] [key.sub=value ...]" 2
recipe=$1
shift
if [ $# -gt 0 ] && [[ $1 == *.yaml || $1 == *.yml ]]; then
  recipe=$1
  shift
fi
overrides=("$@")

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a Slurm allocation: submit with sbatch slurm/pretrain.sh [RECIPE] [key=value ...]" 2

# --- the repository this script belongs to (pretrain.sh/finetune.sh found it)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || die "cannot cd to $ROOT"

if [ -n "${MMSCALE_PYTHON:-}" ]; then PY=$MMSCALE_PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi
# the prefix (a container runtime) wraps every python call; word-split on purpose
read -r -a prefix <<<"${MMSCALE_LAUNCH_PREFIX:-}"
read -r -a srun_extra <<<"${MMSCALE_SRUN_ARGS:-}"

# --- the allocation
nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
# workers per node: the GPUs asked for per node (--gpus-per-node=8 or =a100:8), else the GPUs
# Slurm gave the node (--gres=gpu:8, --gpus=N); an --exclusive node may hold more than asked
nproc=${MMSCALE_NPROC_PER_NODE:-}
if [ -z "$nproc" ] && [[ "${SLURM_GPUS_PER_NODE:-}" =~ ^([A-Za-z0-9_-]+:)?([0-9]+)$ ]]; then
  nproc=${BASH_REMATCH[2]}
fi
nproc=${nproc:-${SLURM_GPUS_ON_NODE:-}}
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "no GPUs in this allocation: ask for --gpus-per-node=G or set MMSCALE_NPROC_PER_NODE" 2
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
# the rendezvous host: the first node's address as Slurm knows it (NodeAddr; the node name
# where NodeAddr is not set), so names that are not in DNS still work
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=${MMSCALE_MASTER_ADDR:-$(scontrol show node -o "$first" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')}
MASTER_ADDR=${MASTER_ADDR:-$first}
# per job and per attempt, so a requeued job on the same node never meets its old socket
MASTER_PORT=${MMSCALE_MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 13 + ${SLURM_RESTART_COUNT:-0}) % 10000))}
export MASTER_ADDR MASTER_PORT
export PYTHONUNBUFFERED=1
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${MMSCALE_STOP_TIMEOUT:-150}

# --- the recipe is checked here, on the batch node, before any GPU starts: a bad key or a
# global batch that does not split over nnodes x nproc ranks ends the job (exit 2, no requeue).
# The run folder it names is where checkpoints/latest lives.
run_dir=$("${prefix[@]}" "$PY" -c '
import sys
try:
    from mmscale import config
    from mmscale.engine.backend import check_world
except Exception as e:
    sys.exit(f"cannot import mmscale here ({e})")
try:
    cfg = config.load_config(sys.argv[2], sys.argv[3:])
    check_world(cfg, int(sys.argv[1]))
    print(cfg.train.run_dir)
except config.ConfigError as e:
    print(f"mmscale: config error: {e}", file=sys.stderr)
    sys.exit(2)
' "$((nnodes * nproc))" "$recipe" "${overrides[@]}")
case $? in
  0) ;;
  2) die "recipe $recipe ${overrides[*]} on $((nnodes * nproc)) ranks: see the config error above" 2 ;;
  # e.g. python only exists inside the container that MMSCALE_SRUN_ARGS names
  *) log "warning: could not load the recipe with $PY here; the workers will check it"; run_dir="(see the recipe)" ;;
esac

# every node's address as Slurm knows it, for torchrun's --local_addr (PET_LOCAL_ADDR) on that
# node: without it, the first node's torchrun tells the workers of every node to reach it at its
# fully qualified name, which is "localhost" on hosts whose /etc/hosts maps their own name to
# 127.0.0.1 (Debian's and many images' default), and the other nodes' workers cannot start
node_addrs=""
if [ "$nnodes" -gt 1 ]; then
  for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
    addr=$(scontrol show node -o "$node" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
    node_addrs+="$node=${addr:-$node} "
  done
fi
export MMSCALE_NODE_ADDRS=$node_addrs MMSCALE_FIRST_NODE=$first

# underscore spellings: accepted by every torchrun since 1.10
train=("${prefix[@]}" "$PY" -m torch.distributed.run
  --nnodes="$nnodes" --nproc_per_node="$nproc"
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"
  --max_restarts=0
  mmscale/train.py "$recipe" "${overrides[@]}")
# run on each node before torchrun (torchrun reads PET_<OPTION> for an option not given; a
# user's own PET_ variables win): its own address, and whether it hosts the rendezvous store.
# torchrun guesses the host by comparing the endpoint with the addresses its hostname resolves
# to, which misses where the hostname resolves to 127.0.0.1: then no node serves the store
on_node=(bash -c 'for pair in $MMSCALE_NODE_ADDRS; do
  [ "${pair%%=*}" = "${SLURMD_NODENAME:-}" ] && export PET_LOCAL_ADDR=${PET_LOCAL_ADDR:-${pair#*=}}
done
host=false; [ "${SLURMD_NODENAME:-}" = "$MMSCALE_FIRST_NODE" ] && host=true
export PET_RDZV_CONF=${PET_RDZV_CONF:-is_host=$host}
exec "$@"' mmscale-node)
srun_cmd=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
[ -n "$cpus" ] && srun_cmd+=(--cpus-per-task="$cpus")  # srun no longer inherits it (22.05+)
[ "$nnodes" -gt 1 ] && srun_cmd+=(--label)
srun_cmd+=("${srun_extra[@]}")

log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on $SLURM_JOB_NODELIST: $nnodes node(s) x $nproc worker(s)"
log "recipe $recipe ${overrides[*]}; run folder $run_dir; rendezvous $MASTER_ADDR:$MASTER_PORT"
if [ -f "$run_dir/checkpoints/latest" ]; then
  log "resuming from $run_dir/checkpoints/$(cat "$run_dir/checkpoints/latest")"
fi

if [ -z "$stop" ]; then
  log "${srun_cmd[*]} ${train[*]}"
  "${srun_cmd[@]}" "${on_node[@]}" "${train[@]}" &
  srun_pid=$!
  rc=0
  # `wait` returns early whenever a trapped signal arrives; keep waiting for srun itself
  while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"
    rc=$?
  done
  wait "$srun_pid" 2>/dev/null
  last=$?
  [ "$last" -ne 127 ] && rc=$last
else
  rc=1  # a stop request before the step started
fi
log "training step exited with $rc"

if [ "$rc" -eq 0 ]; then
  [ -f "$run_dir/results.json" ] && log "finished: $run_dir/results.json"
  exit 0
fi
# USR1 is the only stop this script is asked to turn into a requeue (75, the engine's
# "stopped at a checkpoint", reaches here only from launchers that pass exit codes through);
# after Slurm's own SIGTERM, Slurm decides (a requeue or preemption requeues, scancel ends)
# A lost node (power, kernel, network): the ranks left name it and exit 69, torchrun reports 1.
# Tell it from a crash by asking every node of the allocation to run a step: a node that cannot
# is lost, and the job is requeued to resume from checkpoints/latest on nodes that work. When
# every node answers, the failure was the code's: the job ends, without a requeue loop.
lost_node=""
if [ "$rc" -ne 0 ] && [ -z "$stop" ] && [ "$nnodes" -gt 1 ]; then
  if ! timeout "${MMSCALE_NODE_CHECK_TIMEOUT:-60}" srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
      "${srun_extra[@]}" true >/dev/null 2>&1; then
    lost_node=1
    log "a node of this allocation no longer runs a step: it was lost"
  fi
fi
if [ "$stop" = USR1 ] || [ -n "$lost_node" ] || { [ "$rc" -eq 75 ] && [ "$stop" != TERM ]; }; then
  log "requeueing job $SLURM_JOB_ID; it resumes from $run_dir/checkpoints/$(cat "$run_dir/checkpoints/latest" 2>/dev/null || echo '(none yet)')"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed (the job needs --requeue); resubmit the same command to resume"
  exit 0
fi
exit "$rc"
