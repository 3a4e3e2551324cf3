#!/usr/bin/env bash
# N local processes form one JAX runtime (jax.distributed over gloo CPU collectives) and
# train together: the code path of a TPU pod or a GPU cluster, on one machine.
#
#   bash launch/multiprocess.sh N CONFIG [trainer flags...]
#   bash launch/multiprocess.sh 2 configs/tiny_kv.py --workdir=runs/mp --config.train.steps=50
#
# Each process gets DEVICES_PER_PROCESS simulated CPU devices (default 1), its own slice
# of every global batch, and writes its shard of each checkpoint to the one workdir.
# Process 0 prints to the console; process i>0 logs to WORKDIR/process_i.log. If any process
# fails, the others are stopped and the exit status is the first failure's. Ctrl-C / SIGTERM
# is forwarded to every process (the trainer saves a checkpoint and exits).
# Env: DEVICES_PER_PROCESS, COORDINATOR_PORT (default: a free port), WORKDIR (default
# runs/multiprocess, when no --workdir flag is given).
set -euo pipefail
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: bash launch/multiprocess.sh N CONFIG [trainer flags...]  (N: number of processes, got '${1:-}')" >&2
  exit 2
fi
N="$1"; CONFIG="$2"; shift 2
if [ ! -f "$CONFIG" ] && [ ! -f "$(dirname "$0")/../$CONFIG" ]; then
  echo "multiprocess.sh: config file '$CONFIG' not found" >&2
  exit 2
fi
source "$(dirname "$0")/_env.sh" requirements.txt

WORKDIR="${WORKDIR:-runs/multiprocess}"
for a in "$@"; do
  case "$a" in --workdir=*) WORKDIR="${a#--workdir=}" ;; esac
done
mkdir -p "$WORKDIR"
PORT="${COORDINATOR_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("localhost",0)); print(s.getsockname()[1])')}"
DEV="${DEVICES_PER_PROCESS:-1}"
echo "[multiprocess] $N processes x $DEV CPU device(s), coordinator localhost:$PORT, workdir $WORKDIR"

pids=()
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap 'stop_all' INT TERM
for ((i = 0; i < N; i++)); do
  env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEV ${XLA_FLAGS:-}" \
      JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
      "$PY" -m jaxlm.train --config="$CONFIG" --workdir="$WORKDIR" --config.distributed=True \
      --config.mesh.devices=0 "$@" \
      > >(if [ "$i" = 0 ]; then cat; else cat > "$WORKDIR/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done

status=0
remaining=$N
# Wait for each process; on the first failure stop the rest (a peer that lost its
# coordinator would otherwise hang in a collective until its timeout).
while [ "$remaining" -gt 0 ]; do
  set +e
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  set -e
  remaining=$((remaining - 1))
  left=()   # waited for: not waited for again
  for p in "${pids[@]}"; do [ "$p" = "${done_pid:-}" ] || left+=("$p"); done
  pids=("${left[@]}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    echo "[multiprocess] a process exited with status $rc; stopping the others" >&2
    stop_all
  fi
done
if [ "$status" -ne 0 ]; then
  for ((i = 1; i < N; i++)); do
    [ -f "$WORKDIR/process_$i.log" ] && { echo "--- process $i (tail) ---" >&2; tail -n 20 "$WORKDIR/process_$i.log" >&2; }
  done
fi
exit "$status"
