#!/usr/bin/env bash
# Submit one fips_jax config as a multi-node GPU job to SLURM: one task per node, each driving
# all GPUs of its node.
#
#   launch/slurm.sh --config configs/llama3_8b.py --workdir /shared/runs/llama3_8b \
#       [--nodes 2] [--gpus-per-node 8] [--cpus-per-task 16] [--time 16:00:00] \
#       [--partition P] [--account A] [--venv /shared/venvs/fips] [--dry-run] [-- --config.KEY=VALUE ...]
#
# The workdir and this checkout must be on a filesystem every node sees. The batch script is
# written to <workdir>/_launch/<job name>.sbatch and submitted with sbatch; `srun` starts
# `python -m launch.run` once per node, whose jax.distributed.initialize() reads SLURM_* (the
# coordinator is the first node of the step). JAX_LOCAL_DEVICE_IDS lists every GPU of the node:
# jax's SLURM default would give each task only the GPU numbered by its local task id.
# Rerunning the same command resumes from the checkpoints in the workdir.
# --dry-run prints the batch script and the sbatch command, and writes and submits nothing.
set -euo pipefail
source "$(dirname "$0")/common.sh"

NODES=1 GPUS=8 CPUS=16 TIME="16:00:00" PARTITION="" ACCOUNT="" VENV=""
declare -A VALUE_OPTIONS=([--nodes]=NODES [--gpus-per-node]=GPUS [--cpus-per-task]=CPUS [--time]=TIME
                         [--partition]=PARTITION [--account]=ACCOUNT [--venv]=VENV)
parse_args "$@"

[[ -n "$CONFIG" && -n "$WORKDIR" ]] || usage
check_config
[[ "$WORKDIR" == /* ]] || die "--workdir must be an absolute path on a shared filesystem, got $WORKDIR"
[[ "$NODES" =~ ^[1-9][0-9]*$ && "$GPUS" =~ ^[1-9][0-9]*$ && "$CPUS" =~ ^[1-9][0-9]*$ ]] \
  || die "--nodes, --gpus-per-node and --cpus-per-task must be positive integers"
[[ -z "$VENV" || -f "$VENV/bin/activate" || "$DRY_RUN" == 1 ]] || die "no virtualenv at $VENV"
check_overrides

WORKDIR="${WORKDIR%/}"
NAME="fips-$(basename "$CONFIG" .py)"
SCRIPT="$WORKDIR/_launch/$NAME.sbatch"
ARGS="--config=$(printf %q "$CONFIG") --workdir=$(printf %q "$WORKDIR")$(quoted_overrides)"
DEVICE_IDS="$(seq -s, 0 $((GPUS - 1)))"

BATCH="#!/bin/bash
#SBATCH --job-name=$NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/_launch/slurm-%j.out"
[[ -n "$PARTITION" ]] && BATCH+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -n "$ACCOUNT" ]] && BATCH+=$'\n'"#SBATCH --account=$ACCOUNT"
BATCH+="
set -euo pipefail
cd $(printf %q "$REPO")"
[[ -n "$VENV" ]] && BATCH+=$'\n'"source $(printf %q "$VENV")/bin/activate"
BATCH+="
# One process per node drives all $GPUS GPUs of its node.
export JAX_LOCAL_DEVICE_IDS=$DEVICE_IDS
srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m launch.run $ARGS"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "# $SCRIPT"
  echo "$BATCH"
  echo "+ sbatch $(printf %q "$SCRIPT")"
  exit 0
fi

mkdir -p "$WORKDIR/_launch"
printf '%s\n' "$BATCH" > "$SCRIPT"
sbatch "$SCRIPT"
