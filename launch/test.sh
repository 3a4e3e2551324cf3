#!/usr/bin/env bash
# Run the test suite on 8 simulated CPU devices; sets up .venv with test extras first.
# Extra arguments go to pytest, e.g.  bash launch/test.sh tests/test_model.py -k parity
source "$(dirname "$0")/_env.sh" requirements-test.txt
# libtpu (optional, requirements-tpu.txt) lets tests/test_aot.py compile for a TPU topology.
# It goes into .venv/tpu-extra, which only that test puts on its path: importable from
# site-packages, libtpu would make every `import jax` probe for a TPU. If it cannot be
# installed here, that one test skips and says so.
LIBTPU="$(grep -E '^libtpu==' requirements-tpu.txt)"
if [ ! -f ".venv/tpu-extra/.installed-$LIBTPU" ]; then
  rm -rf .venv/tpu-extra
  if "$PY" -m pip install -q --target .venv/tpu-extra "$LIBTPU" 2> >(grep -v "is ignored" >&2); then
    touch ".venv/tpu-extra/.installed-$LIBTPU"
  else
    echo "[jaxlm] $LIBTPU could not be installed: the TPU ahead-of-time test will skip" >&2
  fi
fi
export XLA_FLAGS="--xla_force_host_platform_device_count=8 ${XLA_FLAGS:-}"
export JAX_PLATFORMS=cpu
# --durations=20: where the time goes (the suite must stay under 20 minutes on 2 cores)
exec "$PY" -m pytest -q --durations=20 tests "$@"
