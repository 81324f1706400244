"""Scoring: prediction/gold objects -> sets of (class, key) facts -> TP/FP/FN -> P/R/F1. Never imports torch."""
