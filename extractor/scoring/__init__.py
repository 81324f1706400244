"""Scoring: prediction/gold objects -> sets of (class, key) facts -> TP/FP/FN -> P/R/F1 (facts, metrics,
evaluate, document); the HTML report of a result (report), paired comparison of runs (compare) and its
gate's calibration by simulation (calibration). Never imports torch."""
