"""`hf` backend: transformers (+ peft adapters). Greedy base-weight runs of Llama/Qwen2-style models go
through FastDecoder (`--fast`, fast.py; CUDA graphs and compilation on CUDA only); everything else through
`generate` in length-sorted, token-budgeted, left-padded batches."""
from __future__ import annotations

import itertools
import json
import sys
from collections import deque
from dataclasses import replace
from pathlib import Path

from extractor.backends.base import (LENGTH, STOP, GenParams, Generation, Request, TokenizerBackend, batched,
                                     name_adapters)
from extractor.backends.hf_weights import Weights
from extractor.backends.model_files import (WEIGHT_PATTERNS, check_adapter_dir, check_model_dir,  # noqa: F401
                                            file_fingerprint, load_tokenizer)
from extractor.backends.model_load import load_base_model, resolve_device, resolve_dtype
from extractor.errors import ModelError

# Python's switch interval while the fast path decodes with a constraint (None: leave it). There the main
# thread mostly waits (on the GPU, on grammar workers' answers) and must take the GIL back from the writer
# thread (parsing, validating) as soon as an answer arrives; by default that can take 5 ms. Measured (run 19,
# docs/benchmarks.md): the constrained run path went from 29,812 to 34,129 output tok/s with 0.5 ms.
CONSTRAINED_SWITCH_INTERVAL: float | None = 0.0005

IN_USE = object()  # a request's key when it names no adapter in a call that names none: the adapter in use


class _Lookahead:
    """An iterator of requests that can be looked ahead of by a bounded window."""

    def __init__(self, items):
        self._items = iter(items)
        self._ahead: deque = deque()

    def peek(self, n: int) -> list:
        while len(self._ahead) < n and (item := next(self._items, None)) is not None:
            self._ahead.append(item)
        return list(itertools.islice(self._ahead, n))

    def take(self, n: int) -> list:
        self.peek(n)
        return [self._ahead.popleft() for _ in range(min(n, len(self._ahead)))]

    def take_while(self, keep):
        """Items while `keep(item)`, pulled one at a time; the first one that fails stays ahead."""
        while self.peek(1) and keep(self._ahead[0]):
            yield self._ahead.popleft()


class HFBackend(TokenizerBackend):
    name = "hf"
    supports_constrained = True

    def __init__(self, model: str, adapters=(), dtype: str = "auto", device: str = "auto",
                 trust_remote_code: bool = False, batch_size: int = 32, batch_tokens: int = 32768,
                 fast: str = "auto", compile: str | bool = "auto", quiet: bool = False, **_):
        check_model_dir(Path(model))  # before torch is imported: a broken folder is refused in a second
        from extractor.backends.startup import Startup
        self.startup = Startup(say=not quiet and sys.stderr.isatty())  # in logs the manifest has the times
        with self.startup.phase("importing torch and transformers"):
            import torch
            from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        self.torch = torch
        self.model_path = Path(model)
        self.adapter_paths = name_adapters(adapters, check_adapter_dir)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.fast_mode = fast
        self.compile = compile
        self._expected_tokens: int | None = None
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:  # the tokenizer is read while the weights load
            tokenizer = pool.submit(load_tokenizer, self.model_path, trust_remote_code)
            base = self._load_weights(self.model_path)
            self.tokenizer = tokenizer.result()
        self._attach(base, self.tokenizer)

    def _load_weights(self, path: Path):
        return load_base_model(path, self.dtype, self.device, self.trust_remote_code, self.startup)

    def use_checkpoint(self, path: Path) -> None:
        """Another full checkpoint of the same architecture and tokenizer, its weights copied into the loaded
        model's own tensors: the decoder keeps its cache, compiled code and graphs; its shared-prefix K/V
        are recomputed. Anything else is refused in one line (run that checkpoint in its own command)."""
        from extractor.backends.checkpoint_swap import check_swappable, load_in_place
        from extractor.backends.startup import size_text
        path = Path(path)
        check_swappable(self.model_path, path)
        if self.adapter_paths:
            raise ModelError("several --model with --adapter: score each checkpoint's adapters in a command of its own")
        self.use_adapter(None)
        size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        with self.startup.phase("switching weights", f"{size_text(size)} from {path}"):
            load_in_place(self.base, path)
        self.model_path = self.weights.model_path = path
        self._spare = self._mix_decoder = self._virtual = None
        if self._fast_decoder is not None:
            with self.startup.phase("recomputing the shared prefix"):
                self._fast_decoder.reuse_for(None)

    def startup_record(self) -> dict | None:
        return self.startup.as_dict()

    def expect(self, records: int | None, params: GenParams) -> None:
        """How many records the run will decode at most (None: unknown): what `--compile auto` weighs."""
        self._expected_tokens = None if records is None else records * params.max_new_tokens

    @classmethod
    def from_loaded(cls, model, tokenizer, model_path: str | Path, batch_size: int = 32,
                    batch_tokens: int = 32768, fast: str = "auto", compile: bool = False) -> "HFBackend":
        """Wrap a model already in memory (training's F1 evaluation) in the same generation code, fast path
        included: a peft model being trained (LoRA, P-tuning, prefix or prompt tuning) is its adapter."""
        import torch
        self = cls.__new__(cls)
        self.torch = torch
        self.model_path = Path(model_path)
        self.adapter_paths = {}
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        self.trust_remote_code = False
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.fast_mode = fast
        self.compile = compile  # off: a checkpoint's evaluation is short, compiling would cost more than it saves
        from extractor.backends.startup import Startup
        self.startup, self._expected_tokens = Startup(say=False), None
        self._attach(model, tokenizer)
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            self.weights.hand_over(model)
        return self

    def _attach(self, model, tokenizer) -> None:
        self._said: set[str] = set()
        self.weights = Weights(model, self.model_path, self.adapter_paths, self.device, self._say_once)
        self.tokenizer = tokenizer
        self.base.eval()
        self._check_tokenizer()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.eos_ids = self._eos_ids()
        self._grammars: dict[str, object] = {}
        self._fast_decoder = None
        self._spare = None  # the last adapter's decoder, kept for the next one (its cache, compiled code, graphs)
        self._virtual = None  # the prompt-learning adapter's virtual part, once computed
        self._mix_decoder = None  # the mixed adapters' decoder (weights.mix), built on first use
        self.plain_reason: str | None = None  # why records last went the plain way (None: --fast off)
        self._stale = False  # the weights changed in place since the decoder computed its prefix K/V

    def weights_changed(self) -> None:
        """The model's own tensors were updated in place (a training step): decoders keep their cache,
        graphs and compiled code, which read those tensors; the shared prefix's K/V and a prompt-learning
        adapter's virtual part are recomputed before the next record. Training scores every checkpoint
        through one backend so, that the fast path's first-use cost is paid once per training."""
        self.base.eval()
        self.model.eval()
        self._virtual = None
        self._stale = True
        self._spare = self._mix_decoder = None

    # What decodes (hf_weights.Weights owns them): the model, the base model under it, the adapter in it.
    model = property(lambda self: self.weights.model)
    base = property(lambda self: self.weights.base)
    adapter = property(lambda self: self.weights.adapter)

    # -- setup ---------------------------------------------------------------------------------------
    def _check_tokenizer(self) -> None:
        vocab = self.base.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > vocab:
            raise ModelError(f"{self.model_path}: tokenizer has {len(self.tokenizer)} tokens but the model's "
                             f"embedding has {vocab}; the tokenizer does not belong to this model")

    def _eos_ids(self) -> list[int]:
        ids = self.base.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        if not ids:
            raise ModelError(f"{self.model_path}: neither the generation config nor the tokenizer names an EOS token")
        return ids

    # -- identity and adapters ----------------------------------------------------------------------------
    def identity(self, adapter: str | None = None) -> dict:
        """The weights requests naming `adapter` decode with (None: base weights). --fast is left out: both
        paths decode the same tokens, and a run the fast path stopped part-way must resume with --fast off.
        Which path each record took is in the manifest's summary."""
        ident = {"backend": self.name, "model": file_fingerprint(self.model_path),
                 "dtype": str(self.dtype).replace("torch.", ""), "trust_remote_code": self.trust_remote_code}
        if adapter in self.adapter_paths:
            ident["adapter"] = {"name": adapter, **file_fingerprint(self.adapter_paths[adapter])}
        return ident

    def use_adapter(self, name: str | None) -> None:
        """Swap adapters on the one base model (hf_weights.Weights.use). The decoder goes with the weights it
        was built on; switching to another adapter keeps it as the spare (its cache and compiled code serve
        the next adapter, its shared-prefix K/V recomputed)."""
        spare = self._fast_decoder or self._spare
        self._fast_decoder = self._virtual = self._mix_decoder = None
        self.weights.use(name)
        if name is not None:
            self._spare = spare

    # -- tokens --------------------------------------------------------------------------------------
    def max_input_tokens(self, params: GenParams, adapter: str | None = None) -> int | None:
        limit = getattr(self.base.config, "max_position_embeddings", None)
        return None if limit is None else limit - params.max_new_tokens - self.weights.virtual_tokens(adapter)

    # -- generation ----------------------------------------------------------------------------------
    mixes_adapters = True  # requests naming different adapters (or None: base) may share one call or stream

    @staticmethod
    def _key(request: Request, named: bool):
        """The weights a request decodes with: its adapter; None is base weights once the call (stream) has
        named an adapter, else the adapter in use (IN_USE: nothing switched)."""
        return request.adapter if request.adapter is not None or named else IN_USE

    def _switch(self, key) -> None:
        if key is not IN_USE and key != self.adapter:
            self.use_adapter(key)

    def generate(self, requests: list[Request], params: GenParams, schema: dict | None = None) -> list[Generation]:
        """Requests naming different adapters: served per adapter (in order of first appearance), each
        generation the one a run of that adapter alone gives."""
        named = any(r.adapter is not None for r in requests)
        keys = [self._key(r, named) for r in requests]
        groups = list(dict.fromkeys(keys))
        if len(groups) <= 1:
            self._switch(groups[0] if groups else IN_USE)
            return self._generate_one(requests, params, schema)
        if self._mixes(groups, params):
            out = {id(r): g for pairs in self._fast_stream(iter(requests), params, schema, (), mixed=True)
                   for r, g in pairs}
            return [out[id(r)] for r in requests]
        results: list = [None] * len(requests)
        for key in groups:
            index = [i for i, k in enumerate(keys) if k == key]
            self._switch(key)
            for i, gen in zip(index, self._generate_one([requests[i] for i in index], params, schema)):
                results[i] = gen
        return results

    def _generate_one(self, requests: list[Request], params: GenParams, schema) -> list[Generation]:
        """One adapter's requests (the one in use)."""
        encoded = [self._ids(r) for r in requests]
        budgets = [r.new_tokens(params) for r in requests]
        if encoded and self._use_fast(params):
            return self._generate_fast(encoded, budgets, params, schema)
        return self._generate_plain(encoded, params, schema, budgets=budgets)

    def _generate_plain(self, encoded: list[list[int]], params: GenParams, schema, reason: str | None = None,
                        budgets: list[int] | None = None) -> list[Generation]:
        """`generate` in length-sorted batches, one budget of new tokens per batch; each generation says it
        went the plain way, and why."""
        budgets = budgets or [params.max_new_tokens] * len(encoded)
        results: list[Generation | None] = [None] * len(encoded)
        reason = reason or self.plain_reason
        for budget in dict.fromkeys(budgets):
            own = replace(params, max_new_tokens=budget)
            order = sorted((i for i, b in enumerate(budgets) if b == budget), key=lambda i: len(encoded[i]))
            for batch in self._batches(order, encoded, budget):
                for i, gen in zip(batch, self._generate_safe([encoded[i] for i in batch], own, schema)):
                    gen.decoder, gen.decoder_reason = "plain", reason
                    results[i] = gen
        return results

    # -- the fast path: --fast auto (default): wherever proven, else plain; on: fast or exit 2; off ------------
    def _fast_refusal(self, params: GenParams) -> str | None:
        """Why this call does not take FastDecoder (None: it does)."""
        if self.fast_mode == "off":
            return "--fast off"
        if params.temperature > 0:
            return "sampling (--temperature > 0) decodes with plain generate"
        if self.weights.prompt_learning():
            from extractor.backends.prompt_learning import KINDS, kind
            if kind(self.model) not in KINDS:
                return f"peft adapters of type {kind(self.model)} decode with plain generate"
        from extractor.backends.fast.families import refusal
        return refusal(self.base)  # a LoRA adapter's layers are injected into the base: its own forward runs them

    def _use_fast(self, params: GenParams) -> bool:
        reason = self._fast_refusal(params)
        if reason is not None:
            self._go_plain(reason)
        return reason is None

    def _go_plain(self, reason: str) -> None:
        """Plain generate from here on for this reason: said once on stderr; with --fast on, one line and exit 2."""
        self.plain_reason = None if reason == "--fast off" else reason
        if self.plain_reason is None or reason in self._said:
            return
        if self.fast_mode == "on":
            raise ModelError(f"--fast on: {reason}; use --fast auto to decode with plain generate instead")
        self._say_once(f"fast path: {reason}; decoding with plain generate", key=reason)

    def _say_once(self, line: str, key: str | None = None) -> None:
        """A line on stderr, once per backend for its key (default: the line itself)."""
        key = line if key is None else key
        if key not in self._said:
            self._said.add(key)
            print(line, file=sys.stderr, flush=True)

    def _generate_fast(self, encoded: list[list[int]], budgets: list[int], params: GenParams,
                       schema=None) -> list[Generation]:
        from extractor.backends.fast import common_prefix
        from extractor.backends.fast.families import FastPathError
        prefix = common_prefix(encoded)
        need = max(len(e) + b for e, b in zip(encoded, budgets)) - len(prefix)
        try:
            decoder = self._decoder(prefix, need)
        except FastPathError as exc:
            self._go_plain(str(exc))
            return self._generate_plain(encoded, params, schema, budgets=budgets)
        outs = decoder.generate([e[len(prefix):] for e in encoded], budgets, constraint=self._constraint(params, schema))
        return [self._generation(len(ids), tokens, finish) for ids, (tokens, finish) in zip(encoded, outs)]

    def _constraint(self, params: GenParams, schema):
        if not params.constrained:
            return None
        from extractor.constrain.batch import BatchConstraint
        self.last_constraint = BatchConstraint(self.grammar(schema))  # its stats: where the CPU time went
        return self.last_constraint

    def _generation(self, prompt_tokens: int, tokens: list[int], finish: str) -> Generation:
        text = self.tokenizer.decode(tokens[:-1] if finish == STOP else tokens, skip_special_tokens=True)
        return Generation(text if finish == STOP else text.rstrip("\ufffd"), prompt_tokens, len(tokens), finish,
                          decoder="fast")

    PEEK = 256  # requests looked at before the run starts: the shared prefix and the cache length come from them

    def generate_stream(self, requests, params: GenParams, schema: dict | None = None, probes: list[str] = ()):
        """Requests naming different adapters: a run of one adapter's requests streams through one decoder
        as long as it lasts; where the next PEEK requests name several adapters, they are served per adapter
        (each one's own run), so the stream is read a bounded window ahead, never whole."""
        source = _Lookahead(requests)
        named = False
        while window := source.peek(self.PEEK):
            named = named or any(r.adapter is not None for r in window)
            keys = list(dict.fromkeys(self._key(r, named) for r in window))
            if len(keys) > 1 and self._mixes(keys, params):  # one decoder, for as long as these adapters last
                members = set(self.weights.mix.names) | {None}
                yield from self._fast_stream(source.take_while(lambda r: r.adapter in members), params, schema,
                                             probes, mixed=True)
                continue
            if len(keys) == 1:  # this adapter's run, for as long as the stream keeps naming it
                key = keys[0]
                self._switch(key)
                yield from self._fast_stream(source.take_while(lambda r: self._key(r, named) == key),
                                             params, schema, probes)
                continue
            window = source.take(len(window))
            for key in keys:
                self._switch(key)
                yield from self._fast_stream(iter([r for r in window if self._key(r, named) == key]),
                                             params, schema, probes)

    def _fast_stream(self, requests, params: GenParams, schema, probes, mixed: bool = False):
        """The fast path over one adapter's requests (mixed: the mixed adapters' and base requests, each row
        its own adapter's LoRA): later requests enter slots freed by earlier ones, so the GPU never drains.
        The shared prefix is the task template's (from the probes and the first requests); a record that does
        not start with it, or is longer than the cache, goes through the plain path, in batches. A failure of
        the fast path before any record is out hands every record to the plain path (--fast on: one line,
        exit 2); after that, one line and exit 2, the output kept."""
        from extractor.backends.fast import common_prefix
        from extractor.backends.fast.families import FastPathError
        first = list(itertools.islice(requests, self.PEEK))
        if not first:
            return
        flat = itertools.chain(first, requests)
        if not self._use_fast(params):
            yield from self._plain_stream(flat, params, schema)
            return
        encoded_first = [self._ids(r) for r in first]
        prefix = common_prefix(encoded_first + self.encoder().encode_batch(list(probes)))
        own = max(len(e) + r.new_tokens(params) for e, r in zip(encoded_first, first)) - len(prefix)
        try:
            decoder = (self._mixed_decoder if mixed else self._decoder)(prefix, max(2 * own, 1024))
        except FastPathError as exc:
            self._go_plain(str(exc))
            yield from self._plain_stream(flat, params, schema)
            return
        misfits: list[tuple[Request, list[int], str]] = []
        pending: dict[int, tuple[Request, int]] = {}

        def source():
            key = 0
            for request in flat:
                ids = self._ids(request)
                why = self._misfit(ids, prefix, request.new_tokens(params), decoder.unique_len)
                if why:
                    misfits.append((request, ids, why))
                    continue
                pending[key] = (request, len(ids))
                item = (key, ids[len(prefix):], request.new_tokens(params))
                yield (*item, self.weights.mix.lora.group(request.adapter)) if mixed else item
                key += 1

        def plain(items):
            return self._plain_pairs(items, params, schema)

        constraint = self._constraint(params, schema)
        interval = sys.getswitchinterval()
        if constraint is not None and CONSTRAINED_SWITCH_INTERVAL:
            sys.setswitchinterval(CONSTRAINED_SWITCH_INTERVAL)
        done = 0
        try:
            for key, tokens, finish in decoder.stream(source(), constraint=constraint):
                request, n_prompt = pending.pop(key)
                yield [(request, self._generation(n_prompt, tokens, finish))]
                done += 1
                if len(misfits) >= self.batch_size:
                    yield plain(misfits)
                    done += len(misfits)
                    misfits.clear()
        except (FastPathError, RuntimeError, ValueError, IndexError, TypeError) as exc:
            self._fast_decoder = self._mix_decoder = None
            reason = f"the fast path failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})"
            if done or self.fast_mode == "on":
                raise ModelError(f"{reason} after {done} records; the output so far is kept: rerun with --resume "
                                 "--fast off to finish on the plain path") from None
            self._go_plain(reason)
            misfits += [(request, self._ids(request), reason) for request, _ in pending.values()]
            misfits += [(request, self._ids(request), reason) for request in flat]
        finally:
            sys.setswitchinterval(interval)
        for start in range(0, len(misfits), max(1, self.batch_size)):
            yield plain(misfits[start:start + max(1, self.batch_size)])

    @staticmethod
    def _misfit(ids: list[int], prefix: list[int], budget: int, unique_len: int) -> str | None:
        """Why this record cannot go through the decoder (None: it can)."""
        if ids[: len(prefix)] != prefix or len(ids) == len(prefix):
            return "the record does not start with the task's shared prompt prefix"
        if len(ids) - len(prefix) + budget > unique_len:
            return "the record is longer than the fast path's cache"
        return None

    def _plain_stream(self, requests, params: GenParams, schema):
        for batch in batched(requests, self.batch_size):
            yield self._plain_pairs([(r, self._ids(r), None) for r in batch], params, schema)

    def _plain_pairs(self, items, params: GenParams, schema) -> list:
        """(request, ids, why) through the plain path: one pass per reason (None: plain_reason) and, with
        adapters mixed, per adapter (peft's own forward with that adapter alone)."""
        out = []
        mixed = self.weights.mix is not None
        for why, adapter in dict.fromkeys((w, r.adapter if mixed else None) for r, _, w in items):
            group = [(r, ids) for r, ids, w in items if w == why and (not mixed or r.adapter == adapter)]
            with self.weights.plain(adapter):
                gens = self._generate_plain([ids for _, ids in group], params, schema, reason=why,
                                            budgets=[r.new_tokens(params) for r, _ in group])
            out += [(request, gen) for (request, _), gen in zip(group, gens)]
        return out

    # -- several LoRA adapters mixed in one decoder ------------------------------------------------------
    def decodes_together(self, adapters: list[str], params: GenParams) -> bool:
        """Only LoRA adapters that mix exactly in one FastDecoder (else each switch re-merges the weights and
        drains the decoder: one adapter after another is faster)."""
        return self.mixes_adapters and self._mixes(list(adapters), params)

    def _mixes(self, keys: list, params: GenParams) -> bool:
        """Whether requests of these keys (adapter names, None: base) decode mixed in one FastDecoder: two
        or more sets of weights, at least one a LoRA adapter, all of them mixable exactly (else said in one
        line, and they decode one adapter at a time); loads them if another set is loaded."""
        names = [k for k in keys if k is not None]
        if IN_USE in keys or len(keys) < 2 or not names or any(n not in self.adapter_paths for n in names):
            return False
        if self.weights.mixing(names):
            return True
        if self.fast_mode == "off" or params.temperature > 0:
            return False  # the per-adapter path says why it goes plain
        from extractor.backends.fast.families import refusal
        if refusal(self.base) is not None or self.weights.refuses_mix(names):
            return False
        self.use_adapter(None)
        self._spare = None  # mixing moves some base weights' storage (lora_mixed's fold): no decoder outlives it
        return self.weights.load_mix(names)

    def _mixed_decoder(self, prefix: list[int], need: int):
        """The mixed adapters' decoder, kept while they are loaded; rebuilt for another prefix or a longer cache."""
        dec = self._mix_decoder
        if dec is None or dec.prefix != prefix or dec.unique_len < need:
            self._mix_decoder = None
            self._mix_decoder = self._new_decoder(prefix, need, adapters=self.weights.mix.lora)
        return self._mix_decoder

    def _decoder(self, prefix: list[int], need: int):
        """One decoder per shared prefix, kept across calls (its cache, prefix KV and CUDA graphs are the
        expensive part); rebuilt when a call needs a longer cache."""
        self.weights.merge()

        def fits(dec) -> bool:
            return dec is not None and dec.prefix == prefix and dec.unique_len >= need
        if fits(self._fast_decoder):
            if self._stale and not self._fast_decoder.reuse_for(self._virtual_prefix()):
                self._fast_decoder = None  # the virtual part changed shape: a decoder of its own
                return self._decoder(prefix, need)
            self._stale = False
            return self._fast_decoder
        spare, self._spare = self._spare, None
        if fits(spare) and spare.reuse_for(self._virtual_prefix()):  # another adapter: same cache, K/V recomputed
            self._fast_decoder = spare
            return spare
        self._fast_decoder = spare = None  # the old one's memory free before the new one's is taken
        self._fast_decoder = self._new_decoder(prefix, need, virtual=self._virtual_prefix())
        return self._fast_decoder

    def _new_decoder(self, prefix: list[int], need: int, **kwargs):
        from extractor.backends.fast import FastDecoder, slots_for_memory
        cuda = self.device.startswith("cuda")
        if cuda:
            self.torch.cuda.empty_cache()
        unique_len = -(-need // 64) * 64
        # Off CUDA the cache is host memory: --batch-size rows, at most --batch-tokens positions in all.
        slots = slots_for_memory(self.base, unique_len, self.device) if cuda else \
            max(1, min(self.batch_size, self.batch_tokens // unique_len))
        compile = self._compiles(cuda)
        with self.startup.phase("compiling the fast path" if compile else "building the fast path",
                                f"({slots} slots of {unique_len} positions)"):
            dec = FastDecoder(self.base, prefix, slots=slots, unique_len=unique_len, eos_ids=self.eos_ids,
                              compile=compile, **kwargs)
        dec.capture()
        return dec

    def _compiles(self, cuda: bool) -> bool:
        """torch.compile around the layers' forward (`--compile`; from_loaded takes a bool): auto compiles on
        CUDA only where the run's output tokens repay the compile (startup.choose_compile); the choice and
        why go in the start-up record of the manifest."""
        from extractor.backends.startup import choose_compile
        setting = self.compile if isinstance(self.compile, str) else ("on" if self.compile else "off")
        choice = choose_compile(setting, cuda, self._expected_tokens)
        self.startup.note("compile", choice.as_dict())
        return choice.compile

    def _batches(self, order: list[int], encoded: list[list[int]], max_new: int):
        """Consecutive runs of the length-sorted order, each under the batch size and the token budget."""
        batch: list[int] = []
        for i in order:
            longest = len(encoded[i]) + max_new  # sorted ascending: the newest is the longest
            if batch and (len(batch) + 1 > self.batch_size or (len(batch) + 1) * longest > self.batch_tokens):
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
            if self.device.startswith("cuda"):
                self.torch.cuda.empty_cache()
            if len(batch) == 1:
                return [Generation("", len(batch[0]), 0, STOP, error="out of memory on this record")]
            mid = len(batch) // 2
            return self._generate_safe(batch[:mid], params, schema) + self._generate_safe(batch[mid:], params, schema)

    def _generate_batch(self, batch: list[list[int]], params: GenParams, schema) -> list[Generation]:
        if self.weights.prompt_learning():
            return self._generate_prompt_learning(batch, params, schema)
        torch = self.torch
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
        kwargs = {"max_new_tokens": params.max_new_tokens, "pad_token_id": pad, "eos_token_id": self.eos_ids}
        if params.temperature > 0:
            torch.manual_seed(params.seed)
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.constrained:
            from extractor.backends.hf_constrain import SchemaLogitsProcessor
            kwargs["logits_processor"] = [SchemaLogitsProcessor(self.grammar(schema), params.max_new_tokens)]
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = out[:, width:].tolist()
        return [self._finish(ids, tokens) for ids, tokens in zip(batch, new_tokens)]

    def _virtual_prefix(self):
        """A prompt-learning adapter's virtual part (None without one), computed once per adapter for both
        paths: its tokens or K/V go first in the fast path's shared prefix and before each plain record."""
        if not self.weights.prompt_learning():
            return None
        if self._virtual is None:
            from extractor.backends.prompt_learning import virtual_prefix
            self._virtual = virtual_prefix(self.model, self.dtype)
        return self._virtual

    def _generate_prompt_learning(self, batch: list[list[int]], params: GenParams, schema) -> list[Generation]:
        """Prompt tuning, P-tuning, prefix tuning: one record at a time as peft's forward defines them
        (prompt_learning.py says why not `generate`)."""
        from extractor.backends.prompt_learning import decode
        if params.temperature > 0:
            self.torch.manual_seed(params.seed)
        if params.constrained:
            from extractor.backends.hf_constrain import SchemaLogitsProcessor
        gens = []
        for ids in batch:  # a processor holds one row's grammar state: one per record
            processor = SchemaLogitsProcessor(self.grammar(schema), params.max_new_tokens) \
                if params.constrained else None
            tokens = decode(self.model, self._virtual_prefix(), ids, params.max_new_tokens, self.eos_ids,
                            params.temperature, params.top_p, processor)
            gens.append(self._finish(ids, tokens))
        return gens

    def _finish(self, prompt: list[int], tokens: list[int]) -> Generation:
        for n, tok in enumerate(tokens):
            if tok in self.eos_ids:
                text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
                return Generation(text, len(prompt), n + 1, STOP)
        # A cut-off output can end inside a multi-byte character; drop its replacement character, as vLLM's
        # incremental detokenizer does, so both backends return the same text.
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
        return Generation(text, len(prompt), len(tokens), LENGTH)

    def grammar(self, schema: dict):
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            from extractor.constrain.grammar import Grammar
            vocab = self.base.get_output_embeddings().weight.shape[0]
            self._grammars[key] = Grammar(schema, self.tokenizer, vocab, self.eos_ids)
        return self._grammars[key]

