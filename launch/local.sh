#!/usr/bin/env bash
# The main job on this machine; sets up .venv first. Until the trainer lands it runs the
# model stack end to end on synthetic input (jaxlm/smoke.py). Extra arguments are config
# overrides, e.g.  bash launch/local.sh --config.model.preset=tiny
source "$(dirname "$0")/_env.sh" requirements.txt
exec "$PY" -m jaxlm.smoke --config=configs/smoke.py "$@"
