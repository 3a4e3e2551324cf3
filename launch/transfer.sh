#!/usr/bin/env bash
# The transfer experiment (issue 16): does the main job's synthetic key-value fine-tuning
# carry over to a real task? MDQA (Lost in the Middle's prompt, 10 documents, gold at 1/5/10,
# plus the oracle and closed-book variants) on the base model and on the fine-tuned one,
# then a side-by-side table (n, score ± standard error, difference) and plot.
#   bash launch/local.sh       # first: fine-tunes and writes runs/local/hf
#   bash launch/transfer.sh    # then: evals/smol_base, evals/smol_simple_kv, evals/compare
# Environment: BASE (default embedded:smollm2-135m-instruct), TUNED (default $WORKDIR/hf,
# WORKDIR=runs/local), N questions per setting (default 100), OUT (default evals).
# Extra arguments go to both evaluations, e.g. --batch_size=16. About 16 minutes per model
# with N=100 on a 2-core AVX-512 machine, about twice that on a 2-core AVX2-only one.
source "$(dirname "$0")/_env.sh" requirements.txt
BASE="${BASE:-embedded:smollm2-135m-instruct}"
TUNED="${TUNED:-${WORKDIR:-runs/local}/hf}"
N="${N:-100}"
OUT="${OUT:-evals}"
if [ ! -f "$TUNED/config.json" ]; then
  echo "[jaxlm] transfer: no fine-tuned model at $TUNED ($TUNED/config.json is missing);" \
       "run bash launch/local.sh first, or set TUNED=DIR" >&2
  exit 2
fi
for run in "base=$BASE" "simple_kv=$TUNED"; do
  name="${run%%=*}"
  "$PY" -m jaxlm.evaluate --hf="${run#*=}" --name="$name" --suite=mdqa --num_docs=10 \
      --positions=1,5,10 --mdqa_variants=haystack,oracle,closedbook --num_examples="$N" \
      --max_new_tokens=32 --out="$OUT/smol_$name" "$@"
done
exec "$PY" -m jaxlm.evaluate.compare "$OUT/smol_base" "$OUT/smol_simple_kv" --markdown \
    --out="$OUT/compare"
