#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), put this code on every worker,
# install, and run the trainer on all workers at once. Runs from your workstation (gcloud
# configured); nothing here runs on this machine's JAX.
#
#   bash launch/tpu_pod.sh --name=jaxlm-v5p --zone=us-east5-a --type=v5p-32 \
#       configs/mistral7b_simple_kv.py --workdir=gs://BUCKET/runs/simple_kv \
#       --config.init_from=gs://BUCKET/Mistral-7B-Instruct-v0.1
#   bash launch/tpu_pod.sh --dry-run ...      # print every command, run nothing
#
# Options (before CONFIG; everything after CONFIG goes to python -m jaxlm.train):
#   --name=NAME          TPU VM (or queued resource) name                    [required]
#   --zone=ZONE          e.g. us-east5-a (v5p), us-west4-a (v5e), us-east1-d (v6e) [required]
#   --type=TYPE          accelerator type: v5p-32, v5litepod-16, v6e-8, ...  [required]
#   --project=PROJECT    default: gcloud's configured project
#   --version=RUNTIME    TPU VM software version (default: by generation, see below)
#   --slices=N           multi-slice: N slices of TYPE through a queued resource (default 1)
#   --spot               spot (preemptible) capacity; the trainer saves on SIGTERM and a
#                        rerun resumes from the workdir's newest checkpoint
#   --repo=URL [--ref=BRANCH]  workers git-clone URL; default: copy this checkout (git archive)
#   --detach             start the trainer under nohup (log: ~/jaxlm/train.log on each worker)
#   --delete             delete the slice afterwards
#   --dry-run            print the commands instead of running them
#
# The workdir must be a bucket path (gs://...) that every worker can write: Orbax writes
# one checkpoint from all hosts, and a preempted run resumes from it. jax.distributed finds
# its peers on Cloud TPU by itself (--config.distributed=True). Multi-slice (--slices>1):
# the queued resource sets MEGASCALE_* on each worker and JAX's device list spans all
# slices; put the `data` mesh axis across slices (--config.mesh.data=N) so only gradient
# all-reduces cross the data-center network, and keep fsdp/tensor inside a slice.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

NAME= ZONE= TYPE= PROJECT= VERSION= SLICES=1 SPOT=0 REPO= REF=main DETACH=0 DELETE=0 DRY=0
die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --type=*) TYPE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --slices=*) SLICES="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --detach) DETACH=1 ;;
    --delete) DELETE=1 ;;
    --dry-run) DRY=1 ;;
    --*) die "unknown option '$1' (options come before CONFIG; see the header of $0)" ;;
    *) break ;;
  esac
  shift
done
[ $# -ge 1 ] || die "missing CONFIG (e.g. configs/mistral7b_simple_kv.py)"
CONFIG="$1"; shift
[ -f "$ROOT/$CONFIG" ] || [ -f "$CONFIG" ] || die "config file '$CONFIG' not found"
[ -n "$NAME" ] || die "--name=NAME is required"
[ -n "$ZONE" ] || die "--zone=ZONE is required"
[[ "$TYPE" =~ ^(v[0-9]+[a-z]*|v5litepod)-[0-9]+$ ]] || die "--type='$TYPE' is not a TPU type such as v5p-32 or v6e-8"
[[ "$SLICES" =~ ^[1-9][0-9]*$ ]] || die "--slices='$SLICES' must be a positive integer"
WORKDIR=
for a in "$@"; do case "$a" in --workdir=*) WORKDIR="${a#--workdir=}" ;; esac; done
[ -n "$WORKDIR" ] || die "give --workdir=gs://BUCKET/PATH after CONFIG (all workers write one checkpoint there)"
[[ "$WORKDIR" == gs://* ]] || echo "tpu_pod.sh: warning: --workdir=$WORKDIR is not a gs:// path; workers do not share local disks" >&2

if [ -z "$VERSION" ]; then
  case "$TYPE" in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
GC=(gcloud compute tpus)
LOC=(--zone="$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project="$PROJECT")

_show() {   # shell-quote only the words that need it, so the printed commands read well
  local a; for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf ' %s' "$a"; else printf " '%s'" "${a//\'/\'\\\'\'}"; fi
  done
}
run() {   # run (or print) one command
  if [ "$DRY" = 1 ]; then printf '+'; _show "$@"; printf '\n'; else "$@"; fi
}

# 1. The slice: reuse it if it exists, else create it.
if [ "$SLICES" -gt 1 ]; then
  NODES=(); for ((s = 0; s < SLICES; s++)); do NODES+=("$NAME-$s"); done
  CREATE=("${GC[@]}" queued-resources create "$NAME" --node-count="$SLICES" --node-prefix="$NAME"
          --accelerator-type="$TYPE" --runtime-version="$VERSION" "${LOC[@]}")
  [ "$SPOT" = 1 ] && CREATE+=(--spot)
  if [ "$DRY" = 1 ] || ! "${GC[@]}" queued-resources describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
    run "${CREATE[@]}"
    echo "# wait until: ${GC[*]} queued-resources describe $NAME ${LOC[*]} shows state ACTIVE"
  fi
else
  NODES=("$NAME")
  CREATE=("${GC[@]}" tpu-vm create "$NAME" --accelerator-type="$TYPE" --version="$VERSION" "${LOC[@]}")
  [ "$SPOT" = 1 ] && CREATE+=(--spot)
  if [ "$DRY" = 1 ]; then
    echo "# (creates the slice unless '${GC[*]} tpu-vm describe $NAME ${LOC[*]}' finds it)"
    run "${CREATE[@]}"
  elif ! "${GC[@]}" tpu-vm describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
    run "${CREATE[@]}"
  else
    echo "[tpu_pod] reusing $NAME"
  fi
fi

# 2. The code on every worker, 3. the environment, 4. the trainer on all workers at once.
TRAIN="PYTHONPATH=. .venv/bin/python -m jaxlm.train --config=$(printf '%q' "$CONFIG") --config.distributed=True --config.mesh.devices=0$(printf ' %q' "$@")"
if [ "$DETACH" = 1 ]; then
  TRAIN="nohup bash -c $(printf '%q' "$TRAIN") > train.log 2>&1 < /dev/null &"
fi
if [ -z "$REPO" ]; then
  TAR="/tmp/jaxlm-$NAME.tar.gz"
  run git -C "$ROOT" archive --format=tar.gz -o "$TAR" HEAD
fi
for NODE in "${NODES[@]}"; do
  SSH=("${GC[@]}" tpu-vm ssh "$NODE" "${LOC[@]}" --worker=all)
  if [ -n "$REPO" ]; then
    run "${SSH[@]}" --command="if [ -d jaxlm ]; then git -C jaxlm fetch -q origin $REF && git -C jaxlm checkout -q FETCH_HEAD; else git clone -q --branch $REF $REPO jaxlm; fi"
  else
    run "${GC[@]}" tpu-vm scp "$TAR" "$NODE:jaxlm.tar.gz" "${LOC[@]}" --worker=all
    run "${SSH[@]}" --command="mkdir -p jaxlm && tar xzf jaxlm.tar.gz -C jaxlm"
  fi
  run "${SSH[@]}" --command="cd jaxlm && JAX_EXTRA=tpu bash launch/setup.sh"
done
# All slices' workers must start together: one ssh per slice, in the background.
pids=()
for NODE in "${NODES[@]}"; do
  if [ "$DRY" = 1 ]; then
    run "${GC[@]}" tpu-vm ssh "$NODE" "${LOC[@]}" --worker=all --command="cd jaxlm && $TRAIN"
  else
    "${GC[@]}" tpu-vm ssh "$NODE" "${LOC[@]}" --worker=all --command="cd jaxlm && $TRAIN" &
    pids+=($!)
  fi
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
if [ "$DELETE" = 1 ]; then
  if [ "$SLICES" -gt 1 ]; then
    run "${GC[@]}" queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run "${GC[@]}" tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
fi
exit "$status"
