#!/usr/bin/env bash
# CMLA pretraining on Slurm. From the repository root:
#
#   sbatch slurm/pretrain.sh                                   # recipes/cmla.yaml, 1 node x 8 GPUs
#   sbatch slurm/pretrain.sh recipes/cmla.yaml optim.lr=3e-4   # recipe + overrides
#   sbatch --nodes=4 slurm/pretrain.sh                         # 4 x 8 GPUs (same global batch)
#
# Command-line sbatch options override the defaults below (partition, account, time, GPUs).
# Logs: slurm/logs/<job name>-<job id>.out (one file per job, appended across requeues).
# Requeue/resume and how to adapt it: docs/SLURM.md; the body is slurm/launch.sh.
#SBATCH --job-name=mmscale-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
RECIPE=recipes/cmla.yaml

# sbatch runs a copy of this file, so find the repository from where it was submitted
root=${MMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
if [ ! -f "$root/slurm/launch.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  root=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh.*|\1|p')
fi
exec bash "$root/slurm/launch.sh" "$RECIPE" "$@"
