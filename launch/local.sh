#!/usr/bin/env bash
# The main job on this machine; sets up .venv first. Trains configs/tiny_kv.py from scratch
# on the synthetic key-value retrieval task, evaluates held-out accuracy by gold position,
# prints the table and writes WORKDIR/eval_kv.json, eval_kv.png, metrics.jsonl, TensorBoard
# events, checkpoints and a Hugging Face export. WORKDIR defaults to runs/local; a rerun
# resumes from its checkpoints. Extra arguments are config overrides, e.g.
#   bash launch/local.sh --config.train.steps=200
source "$(dirname "$0")/_env.sh" requirements.txt
WORKDIR="${WORKDIR:-runs/local}"
exec "$PY" -m jaxlm.train --config=configs/tiny_kv.py --workdir="$WORKDIR" "$@"
