"""Evaluation: `python -m jaxlm.evaluate` runs suites (kv, mdqa, flenqa, general,
litm_kv) on a Hugging Face or training checkpoint; `python -m jaxlm.evaluate.compare`
puts runs side by side. Metrics in metrics.py, model calls in runner.py, one module per
suite in suites/, figures in plots.py; retrieval.py is the trainer's periodic check."""
