"""Moved to extractor/backends/fast/families.py. Kept only for extractor/cli/bench_cmd.py, whose import of
`refusal` still names this module; delete once that line reads `extractor.backends.fast.families`."""
from extractor.backends.fast.families import FAMILIES, FastPathError, check_attention_kwargs, refusal

__all__ = ["FAMILIES", "FastPathError", "check_attention_kwargs", "refusal"]
