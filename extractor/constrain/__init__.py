"""Constrained decoding to a task's JSON schema. Imports go one way: batch -> workers -> rows -> grammar.

grammar.py: the schema check and the compiled grammar (closing mode's costs and tokens); rows.py: the rows'
grammar states and host masks (RowEngine); workers.py: RowEngines in worker processes (ShardPool);
batch.py: BatchConstraint, the fast path's per-step masks on the device, and the pools it runs on. The
processor for transformers' `generate` is the hf backend's (backends/hf_constrain.py).
"""
