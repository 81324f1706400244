"""Scoring: prediction/gold objects -> sets of (class, key) facts -> TP/FP/FN -> P/R/F1.

Predictions and gold joined by id (join); facts per scoring kind (facts, normalize); counting and the metrics
document (evaluate, metrics, lenient, examples, analysis, document); where each value is in its record's text
(grounding, alignment, edit_distance, grounded_rate); the HTML report and Markdown summary of a result
(report/); paired comparison of runs (compare). Never imports torch."""
