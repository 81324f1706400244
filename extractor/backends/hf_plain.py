"""The `hf` backend's plain path: transformers' `generate` over records sorted by length, each batch under
--batch-size rows and --batch-tokens positions (its longest prompt plus the new tokens, for every row),
left-padded; a prompt-learning adapter one record at a time as peft's forward defines it (prompt_learning.py
says why not `generate`). Whatever the fast path does not take decodes here, and each generation says it went
the plain way and why.

Also what both paths share: the run's settings (`Knobs`) and the loaded model as they see it (`Loaded`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from extractor.backends.base import LENGTH, STOP, GenParams, Generation, Request, batched
from extractor.backends.hf_weights import Weights
from extractor.errors import ModelError


@dataclass
class Knobs:
    """The hf backend's settings as its decoding paths read them at each call; HFBackend's attributes of the
    same names are these fields (a caller may change `compile` or `fast_mode` between calls)."""
    device: str
    dtype: object  # a torch dtype
    batch_size: int = 32
    batch_tokens: int = 32768
    fast_mode: str = "auto"  # --fast: auto (wherever proven, else plain), on (fast or exit 2), off
    compile: str | bool = "auto"  # --compile auto|on|off; from_loaded passes a bool
    expected_tokens: int | None = None  # output tokens the run decodes at most (None: unknown)


@dataclass
class Loaded:
    """The loaded model as both decoding paths see it: the weights (hf_weights.Weights), the tokenizer, the
    token ids that end an output, the settings, and a compiled grammar per JSON schema."""
    weights: Weights
    tokenizer: object
    eos_ids: list[int]
    knobs: Knobs
    _grammars: dict = field(default_factory=dict)

    @classmethod
    def attach(cls, weights: Weights, tokenizer, knobs: Knobs) -> "Loaded":
        """The tokenizer checked against the model and set to pad on the left; the EOS ids read from the
        generation config and the tokenizer."""
        where = weights.model_path
        vocab = weights.base.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > vocab:
            raise ModelError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                             f"{vocab}; the tokenizer does not belong to this model")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        ids = weights.base.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
            ids.append(tokenizer.eos_token_id)
        if not ids:
            raise ModelError(f"{where}: neither the generation config nor the tokenizer names an EOS token")
        return cls(weights, tokenizer, ids, knobs)

    def grammar(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from extractor.constrain.grammar import Grammar
            vocab = self.weights.base.get_output_embeddings().weight.shape[0]
            self._grammars[key] = Grammar(schema, self.tokenizer, vocab, self.eos_ids)
        return self._grammars[key]


class PlainGenerator:
    """`generate` in length-sorted, token-budgeted, left-padded batches; out of memory, a batch is split."""

    def __init__(self, loaded: Loaded):
        import torch
        self.torch = torch
        self.loaded, self.weights, self.knobs = loaded, loaded.weights, loaded.knobs

    def generate(self, encoded: list[list[int]], params: GenParams, schema, reason: str | None,
                 budgets: list[int] | None = None) -> list[Generation]:
        """Token ids in, generations out in the same order; one budget of new tokens per batch; each
        generation says it went the plain way, and why (`reason`; None: --fast off)."""
        budgets = budgets or [params.max_new_tokens] * len(encoded)
        results: list[Generation | None] = [None] * len(encoded)
        for budget in dict.fromkeys(budgets):
            own = replace(params, max_new_tokens=budget)
            order = sorted((i for i, b in enumerate(budgets) if b == budget), key=lambda i: len(encoded[i]))
            for batch in self._batches(order, encoded, budget):
                for i, gen in zip(batch, self._generate_safe([encoded[i] for i in batch], own, schema)):
                    gen.decoder, gen.decoder_reason = "plain", reason
                    results[i] = gen
        return results

    def pairs(self, items: list[tuple[Request, list[int], str | None]], params: GenParams, schema,
              reason: str | None) -> list[tuple[Request, Generation]]:
        """(request, ids, why) through the plain path: one pass per why (None: `reason`) and, with adapters
        mixed, per adapter (peft's own forward with that adapter alone)."""
        out = []
        mixed = self.weights.mix is not None
        for why, adapter in dict.fromkeys((w, r.adapter if mixed else None) for r, _, w in items):
            group = [(r, ids) for r, ids, w in items if w == why and (not mixed or r.adapter == adapter)]
            with self.weights.plain(adapter):
                gens = self.generate([ids for _, ids in group], params, schema, reason=why or reason,
                                     budgets=[r.new_tokens(params) for r, _ in group])
            out += [(request, gen) for (request, _), gen in zip(group, gens)]
        return out

    def stream(self, requests, ids_of, params: GenParams, schema, reason):
        """Requests in --batch-size batches, in order; `reason()` read as each batch starts."""
        for batch in batched(requests, self.knobs.batch_size):
            yield self.pairs([(r, ids_of(r), None) for r in batch], params, schema, reason())

    def _batches(self, order: list[int], encoded: list[list[int]], max_new: int):
        """Consecutive runs of the length-sorted order, each under the batch size and the token budget."""
        batch: list[int] = []
        for i in order:
            longest = len(encoded[i]) + max_new  # sorted ascending: the newest is the longest
            if batch and (len(batch) + 1 > self.knobs.batch_size or
                          (len(batch) + 1) * longest > self.knobs.batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _generate_safe(self, batch: list[list[int]], params: GenParams, schema) -> list[Generation]:
        """Out of memory: split the batch in halves; a single record that still fails gets an error."""
        try:
            return self._generate_batch(batch, params, schema)
        except self.torch.OutOfMemoryError:
            if self.knobs.device.startswith("cuda"):
                self.torch.cuda.empty_cache()
            if len(batch) == 1:
                return [Generation("", len(batch[0]), 0, STOP, error="out of memory on this record")]
            mid = len(batch) // 2
            return self._generate_safe(batch[:mid], params, schema) + self._generate_safe(batch[mid:], params, schema)

    def _generate_batch(self, batch: list[list[int]], params: GenParams, schema) -> list[Generation]:
        if self.weights.prompt_learning():
            return self._generate_prompt_learning(batch, params, schema)
        torch, device = self.torch, self.knobs.device
        width = max(len(ids) for ids in batch)
        pad = self.loaded.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        kwargs = {"max_new_tokens": params.max_new_tokens, "pad_token_id": pad, "eos_token_id": self.loaded.eos_ids}
        if params.temperature > 0:
            torch.manual_seed(params.seed)
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.constrained:
            from extractor.backends.hf_constrain import SchemaLogitsProcessor
            kwargs["logits_processor"] = [SchemaLogitsProcessor(self.loaded.grammar(schema), params.max_new_tokens)]
        with torch.inference_mode():
            out = self.weights.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = out[:, width:].tolist()
        return [self._finish(ids, tokens) for ids, tokens in zip(batch, new_tokens)]

    def _generate_prompt_learning(self, batch: list[list[int]], params: GenParams, schema) -> list[Generation]:
        """Prompt tuning, P-tuning, prefix tuning: one record at a time as peft's forward defines them."""
        from extractor.backends.prompt_learning import decode
        if params.temperature > 0:
            self.torch.manual_seed(params.seed)
        if params.constrained:
            from extractor.backends.hf_constrain import SchemaLogitsProcessor
        gens = []
        for ids in batch:  # a processor holds one row's grammar state: one per record
            processor = SchemaLogitsProcessor(self.loaded.grammar(schema), params.max_new_tokens) \
                if params.constrained else None
            tokens = decode(self.weights.model, self.weights.virtual_prefix(self.knobs.dtype), ids,
                            params.max_new_tokens, self.loaded.eos_ids, params.temperature, params.top_p, processor)
            gens.append(self._finish(ids, tokens))
        return gens

    def _finish(self, prompt: list[int], tokens: list[int]) -> Generation:
        tokenizer = self.loaded.tokenizer
        for n, tok in enumerate(tokens):
            if tok in self.loaded.eos_ids:
                text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
                return Generation(text, len(prompt), n + 1, STOP)
        # A cut-off output can end inside a multi-byte character; drop its replacement character, as vLLM's
        # incremental detokenizer does, so both backends return the same text.
        text = tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
        return Generation(text, len(prompt), len(tokens), LENGTH)
