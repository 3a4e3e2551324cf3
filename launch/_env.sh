# Sourced by launch/*.sh: create .venv on first use and install a requirements file.
# Re-installs only when the requirements file changed since the last install.
# Usage: source launch/_env.sh requirements.txt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
REQ="${1:-requirements.txt}"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[jaxlm] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
STAMP=".venv/.installed-$(basename "$REQ")"
if [ ! -f "$STAMP" ] || ! cmp -s "$STAMP" <(cat "$REQ" requirements.txt); then
  echo "[jaxlm] installing $REQ into .venv"
  # (this machine's pip.conf names a missing index: drop that one harmless warning)
  .venv/bin/python -m pip install -q --upgrade pip 2> >(grep -v "is ignored" >&2)
  .venv/bin/python -m pip install -q -r "$REQ" 2> >(grep -v "is ignored" >&2)
  .venv/bin/python -m pip check
  cat "$REQ" requirements.txt > "$STAMP"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="$ROOT/.venv/bin/python"
