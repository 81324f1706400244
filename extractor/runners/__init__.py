"""Runners wrap the pipeline (they are not backends): several worker processes on one host."""
