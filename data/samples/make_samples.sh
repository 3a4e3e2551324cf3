#!/usr/bin/env bash
# Regenerates the samples in this folder (tests/test_data_export.py checks they still match).
set -euo pipefail
cd "$(dirname "$0")/../.."
for task in simple_kv multisubkey_kv niah; do
  for fmt in plain hf openai; do
    .venv/bin/python -m jaxlm.data.export --task=$task --num=3 --format=$fmt --seed=0 \
        --answer_template --num_tokens=600 --out=data/samples/$task.$fmt.jsonl 2>/dev/null
  done
done
