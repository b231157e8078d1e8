"""Evaluation: lm-eval on local files (harness.py), held-out metrics (heldout.py), what `eval` and
`generate` take as a target (targets.py), and the report (report.py, plots.py)."""
