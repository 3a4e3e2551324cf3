#!/usr/bin/env bash
# Run the test suite on 8 simulated CPU devices; sets up .venv with test extras first.
# Extra arguments go to pytest, e.g.  bash launch/test.sh tests/test_model.py -k parity
source "$(dirname "$0")/_env.sh" requirements-test.txt
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
exec "$PY" -m pytest -q tests "$@"
