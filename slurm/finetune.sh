#!/usr/bin/env bash
# Fine-tuning on Slurm, with the same launcher and requeue protocol as pretrain.sh. From the
# repository root:
#
#   sbatch slurm/finetune.sh                                        # $RECIPE below, 1 GPU
#   sbatch slurm/finetune.sh recipes/m3col_rosmap.yaml train.seed=1 # recipe + overrides
#   sbatch --gpus-per-node=8 slurm/finetune.sh recipes/...          # a recipe whose batch splits 8 ways
#
# The fine-tuning recipes are small (ROSMAP: a 245-sample full batch), hence one GPU, a share
# of a node and a short limit; command-line sbatch options override any of this.
# Logs: slurm/logs/<job name>-<job id>.out. Details: docs/SLURM.md; the body is slurm/launch.sh.
#SBATCH --job-name=mmscale-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out
RECIPE=recipes/m3col_rosmap.yaml

# sbatch runs a copy of this file, so find the repository from where it was submitted
root=${MMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
if [ ! -f "$root/slurm/launch.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  root=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh.*|\1|p')
fi
exec bash "$root/slurm/launch.sh" "$RECIPE" "$@"
