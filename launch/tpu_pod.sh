#!/usr/bin/env bash
# Run one fips_jax config on every worker of a Cloud TPU VM slice (v5e-8, v4-32, ...).
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --config configs/llama3_8b.py \
#       --workdir gs://BUCKET/runs/llama3_8b [--project PROJECT] \
#       [--env gs://BUCKET/envs/fips-tpu-venv.tar.gz] [--dry-run] [-- --config.fips.budget=0.4 ...]
#
# 1. Here: `git archive HEAD` of this checkout goes to <workdir>/_launch/code.tar.gz, so every
#    worker runs the same committed code (uncommitted edits are not shipped).
# 2. There, through one `gcloud compute tpus tpu-vm ssh --worker=all`, on every worker at once:
#    unpack the code to ~/fips_run/code; get the Python environment, either --env (a tarball of
#    `venv/` built once at ~/fips_run/venv on a worker of the same TPU type) or a fresh venv with
#    `pip install -r requirements.txt jax[tpu]`; mount the workdir's bucket with gcsfuse at
#    ~/gcs/BUCKET (the pipeline writes plain files; Orbax checkpoints and resumes through it);
#    then `FIPS_DISTRIBUTED=1 python -m launch.run --config=... --workdir=~/gcs/BUCKET/...`.
#    launch/run.py calls jax.distributed.initialize(), which finds the slice's workers itself.
#    Every worker's output streams back here and is kept in <workdir>/_launch/<hostname>.log.
#
# Rerunning the same command resumes the run from its checkpoints in the workdir.
# --dry-run prints the commands and runs nothing.
set -euo pipefail
source "$(dirname "$0")/common.sh"

TPU="" ZONE="" PROJECT="" ENV_TARBALL=""
declare -A VALUE_OPTIONS=([--tpu]=TPU [--zone]=ZONE [--project]=PROJECT [--env]=ENV_TARBALL)
parse_args "$@"

[[ -n "$TPU" && -n "$ZONE" && -n "$CONFIG" && -n "$WORKDIR" ]] || usage
check_config
[[ "$WORKDIR" == gs://*/* ]] || die "--workdir must be a GCS path gs://BUCKET/PATH, got $WORKDIR"
[[ -z "$ENV_TARBALL" || "$ENV_TARBALL" == gs://* ]] || die "--env must be a gs:// tarball, got $ENV_TARBALL"
check_overrides

WORKDIR="${WORKDIR%/}"
BUCKET="${WORKDIR#gs://}"; BUCKET="${BUCKET%%/*}"
SUBPATH="${WORKDIR#gs://$BUCKET/}"
CODE="$WORKDIR/_launch/code.tar.gz"
MOUNT='$HOME/gcs/'"$BUCKET"
RUN_DIR="$MOUNT/$SUBPATH"

# The command every worker runs. $HOME and $(hostname) expand there, everything else here.
if [[ -n "$ENV_TARBALL" ]]; then
  SETUP_ENV="[ -x ~/fips_run/venv/bin/python ] || gcloud storage cat $(printf %q "$ENV_TARBALL") | tar xz -C ~/fips_run"
else
  PIP="~/fips_run/venv/bin/pip install -q -r ~/fips_run/code/requirements.txt 'jax[tpu]'"
  SETUP_ENV="[ -x ~/fips_run/venv/bin/python ] || { python3 -m venv ~/fips_run/venv && $PIP; }"
fi
ARGS="--config=$(printf %q "$CONFIG") --workdir=\"$RUN_DIR\"$(quoted_overrides)"
LOG="$RUN_DIR/_launch/\$(hostname).log"
STEPS=(
  "set -euo pipefail"
  "rm -rf ~/fips_run/code && mkdir -p ~/fips_run/code"
  "gcloud storage cat $(printf %q "$CODE") | tar xz -C ~/fips_run/code"
  "$SETUP_ENV"
  "mkdir -p \"$MOUNT\" && { mountpoint -q \"$MOUNT\" || gcsfuse --implicit-dirs $(printf %q "$BUCKET") \"$MOUNT\"; }"
  "mkdir -p \"$RUN_DIR/_launch\" && cd ~/fips_run/code"
  "FIPS_DISTRIBUTED=1 ~/fips_run/venv/bin/python -m launch.run $ARGS 2>&1 | tee -a \"$LOG\""
)
printf -v REMOTE '%s; ' "${STEPS[@]}"
REMOTE="${REMOTE%; }"

SSH=(gcloud compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE")
[[ -n "$PROJECT" ]] && SSH+=("--project=$PROJECT")
SSH+=(--worker=all "--command=$REMOTE")

if [[ "$DRY_RUN" == 1 ]]; then
  echo "+ git -C $(printf %q "$REPO") archive --format=tar.gz HEAD | gcloud storage cp - $(printf %q "$CODE")"
  printf '+'; printf ' %q' "${SSH[@]:0:${#SSH[@]}-1}"; printf " --command='%s'\n" "${REMOTE//\'/\'\\\'\'}"
  echo "# the remote command, one step a line (runs on every worker):"
  printf '#   %s\n' "${STEPS[@]}"
  exit 0
fi

git -C "$REPO" archive --format=tar.gz HEAD | gcloud storage cp - "$CODE"
"${SSH[@]}"
