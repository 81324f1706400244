"""The JSON-schema constraint for transformers' `generate`: a LogitsProcessor over a compiled Grammar.

Note: transformers' continuous batching (`generate_batch`) ignores `logits_processor`; this processor is used
with `generate` and with prompt-learning adapters' own loop (`prompt_learning.decode`).
"""
from __future__ import annotations

from extractor.constrain.grammar import Grammar, JsonScanner, unpack_bitmask_row


class SchemaLogitsProcessor:
    """A transformers LogitsProcessor for one `generate` call: the grammar mask per row, then closing
    mode for a row once its remaining budget is about what closing its open value costs."""

    def __init__(self, grammar: Grammar, max_new_tokens: int):
        self.grammar = grammar
        self.max_new_tokens = max_new_tokens
        self.matchers = None
        self.scanners = None
        self.closing = None
        self.bitmask = None
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        rows = input_ids.shape[0]
        if self.matchers is None:
            self.matchers = [self.grammar.matcher() for _ in range(rows)]
            self.scanners = [JsonScanner() for _ in range(rows)]
            self.closing = [False] * rows
            self.bitmask = self.grammar.allocate_bitmask(rows)
            self.prompt_len = input_ids.shape[1]
        else:
            for i, m in enumerate(self.matchers):
                if not m.is_terminated():
                    token = int(input_ids[i, -1])
                    m.accept_token(token)
                    self.scanners[i].feed(self.grammar.token_texts[token])
        remaining = self.max_new_tokens - (input_ids.shape[1] - self.prompt_len)
        for i, m in enumerate(self.matchers):
            if not m.is_terminated():
                m.fill_next_token_bitmask(self.bitmask, i)
        work = scores if scores.device.type in ("cuda", "cpu") else scores.cpu()
        self.grammar.apply_bitmask(work, self.bitmask)
        if remaining <= self.grammar.watch_window:
            self._close(work, remaining)
        return work.to(scores.device)

    def _close(self, work, remaining: int) -> None:
        import torch
        for i, m in enumerate(self.matchers):
            if m.is_terminated():
                continue
            if not self.closing[i]:
                cost = self.grammar.closing_cost(m, self.scanners[i], cap=max(1, remaining))  # >= remaining: close
                self.closing[i] = remaining <= cost + self.grammar.item_cost
            if self.closing[i]:
                allowed = unpack_bitmask_row(self.bitmask, i, self.grammar.vocab_size)
                token = self.grammar.closing_token(m, allowed, self.scanners[i])
                if token is not None:
                    work[i] = torch.finfo(work.dtype).min
                    work[i, token] = 0
