#!/usr/bin/env bash
# Set up .venv only (what every launch script does first), e.g. on each worker of a pod:
#   bash launch/setup.sh                    # requirements.txt (CPU jax)
#   JAX_EXTRA=tpu bash launch/setup.sh      # + jax[tpu] at the pinned jax version
#   JAX_EXTRA=cuda12 bash launch/setup.sh   # + jax[cuda12] at the pinned jax version
source "$(dirname "$0")/_env.sh" "${1:-requirements.txt}"
echo "[jaxlm] .venv ready: $("$PY" -c 'import jax; print("jax", jax.__version__)')"
