"""extractor: batch LLM information extraction and evaluation."""

__version__ = "0.1.0"
